"""The transparency register as a static website: HTML and JSON, no JavaScript.

Plain HTML with one small inline style sheet: readable on a phone (a viewport and a single
column), headings in order, tables with captions and header cells, language set, every
link with its own words. ``register.json`` holds the same facts for machines.
"""

from __future__ import annotations

import json
import os
from html import escape
from pathlib import Path

from fedtre.transparency.model import (
    PURPOSES,
    REFUSALS,
    ROLES,
    TIERS,
    ProjectEntry,
    Register,
    TrustEntry,
)

STYLE = """
body{font-family:system-ui,sans-serif;line-height:1.5;margin:0 auto;max-width:46rem;
padding:1rem;color:#111;background:#fff}
h1{font-size:1.6rem;line-height:1.25}h2{font-size:1.25rem;margin-top:2rem}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1rem}caption{text-align:left;
font-weight:600;padding:.25rem 0}th,td{border-bottom:1px solid #bbb;padding:.4rem;
text-align:left;vertical-align:top}dt{font-weight:600;margin-top:.6rem}dd{margin:0}
.status{font-weight:700}a{color:#0645ad}nav{margin-bottom:1rem}
.summary{border-left:4px solid #005eb8;padding-left:.8rem}
@media (max-width:30rem){th,td{display:block;border:0;padding:.1rem .2rem}
tr{display:block;border-bottom:1px solid #bbb;padding:.3rem 0}thead{display:none}
td[data-label]::before{content:attr(data-label) ": ";font-weight:600}}
"""


def write_site(register: Register, out: Path) -> list[Path]:
    """Write the site under ``out`` (created); returns every file written."""
    (out / "projects").mkdir(parents=True, exist_ok=True)
    (out / "trusts").mkdir(parents=True, exist_ok=True)
    written = [
        _write(out / "index.html", _index(register)),
        _write(out / "register.json", json.dumps(register.to_json(), indent=1) + "\n"),
    ]
    for p in register.projects:
        written.append(_write(out / "projects" / f"{p.project_id}.html", _project(p, register)))
    for t in register.trusts:
        page = (out / "trusts" / f"{t.trust}.html").resolve()
        if page.parent != (out / "trusts").resolve():  # names are checked; never outside
            raise ValueError(f"not a trust name: {t.trust[:40]!r}")
        written.append(_write(page, _trust(t, register)))
    return written


def _write(path: Path, text: str) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _page(title: str, body: str, up: str = "") -> str:
    nav = f'<nav><a href="{up}index.html">All projects and trusts</a></nav>' if up else ""
    return (
        '<!DOCTYPE html>\n<html lang="en-GB">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)} | fedtre transparency register</title>\n"
        f"<style>{STYLE}</style>\n</head>\n<body>\n{nav}<main>\n{body}\n</main>\n"
        "<footer><p>This register is built from the signed approvals and the tamper-evident "
        "audit logs of the trusts and the coordinator. It shows how data is used; it never "
        "shows anyone's records or any result of a query.</p></footer>\n</body>\n</html>\n"
    )


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _epsilon(value: float) -> str:
    """ε as people read it: up to 4 decimals, no exponent (1,000; 2.9996; 0.25)."""
    return f"{value:,.4f}".rstrip("0").rstrip(".") if value else "0"


def _index(r: Register) -> str:
    rows = "".join(
        f'<tr><td><a href="projects/{_e(p.project_id)}.html">{_e(p.title)}</a></td>'
        f'<td data-label="Purpose">{_e(p.purpose_label)}</td>'
        f'<td data-label="Organisation">{_e(p.organisation_type)}</td>'
        f'<td data-label="Status" class="status">{_e(p.status)}</td>'
        f'<td data-label="Results released">{p.queries_run}</td>'
        f'<td data-label="ε spent">{_epsilon(p.epsilon_spent)}</td></tr>'
        for p in r.projects
    )
    trusts = "".join(
        f'<li><a href="trusts/{_e(t.trust)}.html">How data is used at {_e(t.trust)}, and how '
        "to opt out</a></li>"
        for t in r.trusts
    )
    refusals = "".join(
        f'<tr><td>{_e(REFUSALS.get(k, k))}</td><td data-label="Requests">{n}</td></tr>'
        for k, n in sorted(r.refusals.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    body = f"""<h1>How patient data is used by fedtre</h1>
<p class="summary">Each NHS trust keeps its patients' records inside its own walls. Approved
projects may ask questions; each trust answers only with totals that have deliberate,
measured uncertainty added (differential privacy), so that no answer reveals anything about
one person. Every project below was approved by a committee on which service users sit.</p>
<h2 id="projects">Projects</h2>
<table><caption>Every project that has applied, and what it has done</caption>
<thead><tr><th scope="col">Project</th><th scope="col">Purpose</th>
<th scope="col">Organisation</th><th scope="col">Status</th>
<th scope="col">Results released</th><th scope="col">Privacy cost spent (ε, all trusts)</th>
</tr></thead><tbody>{rows or '<tr><td colspan="6">No projects yet.</td></tr>'}</tbody></table>
<h2 id="trusts">Trusts</h2>
<ul>{trusts or "<li>No trust has taken part yet.</li>"}</ul>
<h2 id="refusals">Requests that were refused</h2>
<p>fedtre refuses any request that is not part of an approved project or goes beyond what
was approved. These are the refusals so far, by reason.</p>
<table><caption>Refused requests by reason</caption>
<thead><tr><th scope="col">Reason</th><th scope="col">Requests</th></tr></thead>
<tbody>{refusals or '<tr><td colspan="2">None.</td></tr>'}</tbody></table>
<h2 id="about-epsilon">About the privacy cost (ε)</h2>
<p>ε ("epsilon") measures how much a result could reveal about any one person: smaller is
safer. Each project has a fixed budget of ε at each trust; when it is spent, the trust
answers no more questions for that project.</p>
{_left_out(r)}<p>Register built {_e(r.generated_at)} (UTC). The same facts for computers:
<a href="register.json">register.json</a>.</p>"""
    return _page("How patient data is used", body)


def _left_out(r: Register) -> str:
    if not r.left_out:
        return ""
    items = "".join(f"<li>{_e(x)}</li>" for x in r.left_out)
    return (
        '<h2 id="left-out">Left out of this register</h2>\n<p>These could not be checked, so '
        f"nothing from them is counted above:</p>\n<ul>{items}</ul>\n"
    )


def _project(p: ProjectEntry, r: Register) -> str:
    approvals = "".join(
        f"<li>{_e(ROLES.get(a.role, a.role))}: "
        f"{'approved' if a.verdict == 'approve' else 'did not approve'} on {_e(a.signed_on)}</li>"
        for a in p.approvals
    )
    tier = TIERS.get(p.highest_tier, p.highest_tier)
    signoff = (
        "Yes: at least one service user approved this project."
        if p.service_user_signoff
        else "No service user has approved this project."
    )
    trusts = "".join(
        f'<tr><td><a href="../trusts/{_e(t.trust)}.html">{_e(t.trust)}</a></td>'
        f'<td data-label="Taking part">{_e(t.participation)}</td>'
        f'<td data-label="Results released">{t.queries}</td>'
        f'<td data-label="ε spent of budget">{_epsilon(t.epsilon_spent)} of '
        f"{_epsilon(t.epsilon_budget)}</td></tr>"
        for t in p.trusts
    )
    dates = [("Applied", p.submitted_on), ("Approved", p.approved_on or "not approved")]
    dates.append(("Approval ends", p.expires_on))
    if p.revoked_on:
        dates.append(("Revoked", p.revoked_on))
    date_list = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in dates)
    body = f"""<h1>{_e(p.title)}</h1>
<p class="status">Status: {_e(p.status)}. {_e(p.status_detail)}</p>
<h2 id="summary">What this project is for, in plain English</h2>
<p class="summary">{_e(p.lay_summary)}</p>
<dl>
<dt>Purpose</dt><dd>{_e(PURPOSES.get(p.purpose, p.purpose))}</dd>
<dt>Organisation</dt><dd>{_e(p.organisation)} ({_e(p.organisation_type)})</dd>
<dt>Data it may use</dt><dd>{_e(", ".join(p.data_used))}; up to {_e(tier)}</dd>
{date_list}
</dl>
<h2 id="approvals">Who approved it</h2>
<ul>{approvals or "<li>No committee member has signed a decision yet.</li>"}</ul>
<p><strong>Service-user sign-off:</strong> {_e(signoff)}</p>
<h2 id="trusts">Trusts taking part, and what has been used</h2>
<table><caption>Results released and privacy cost (ε) spent at each trust</caption>
<thead><tr><th scope="col">Trust</th><th scope="col">Taking part</th>
<th scope="col">Results released</th><th scope="col">ε spent of budget</th></tr></thead>
<tbody>{trusts}</tbody></table>
<p>Results released to the researchers (all trusts combined): {p.queries_run}.</p>"""
    return _page(p.title, body, up="../")


def _trust(t: TrustEntry, r: Register) -> str:
    rows = "".join(
        f'<tr><td><a href="../projects/{_e(pid)}.html">{_e(title)}</a></td>'
        f'<td data-label="Status">{_e(status)}</td>'
        f'<td data-label="Results released">{queries}</td>'
        f'<td data-label="ε spent">{_epsilon(eps)}</td></tr>'
        for pid, title, status, queries, eps in t.projects
    )
    body = f"""<h1>How your data is used at {_e(t.trust)}</h1>
<p class="summary">Your records stay at {_e(t.trust)}. Approved projects below may ask
questions; {_e(t.trust)} answers only with totals that have deliberate uncertainty added,
never with anyone's records.</p>
<h2 id="projects">Projects using data here</h2>
<table><caption>Projects, results released here and privacy cost (ε) spent here</caption>
<thead><tr><th scope="col">Project</th><th scope="col">Status</th>
<th scope="col">Results released</th><th scope="col">ε spent</th></tr></thead>
<tbody>{rows or '<tr><td colspan="4">None yet.</td></tr>'}</tbody></table>
<h2 id="opt-out">How to opt out</h2>
<p>You can choose, at any time, and it takes effect from the next question asked:</p>
<ul>
<li><strong>No research use at all</strong>: your records are left out of every project.</li>
<li><strong>No commercial use</strong>: your records are left out of projects run for a
company's product or service, and still help public-benefit research.</li>
<li><strong>No use of my mental-health records</strong>: your mental-health records are
left out of every project; other records may still be used.</li>
</ul>
<p>To opt out, contact {_e(t.trust)}'s data protection officer or your care team. If the
national data opt-out applies to you, {_e(t.trust)} honours it here too. If you think a
record about you is wrong, you can ask the trust to mark it as disputed.</p>"""
    return _page(f"How your data is used at {t.trust}", body, up="../")
