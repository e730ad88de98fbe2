"""The public transparency register, built from a real federation's approvals and audit logs,
rendered in headless Chromium, and scanned for anything from the data.

Chromium is Debian's (``.ci/run`` installs it); a local run without it skips with a message,
CI never does.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from fedtre.answer import NotReleased
from fedtre.catalog import Catalog
from fedtre.errors import UserError
from tests.integration.federation import PROJECT, Federation, make_databases, make_pki

CANARY_SQL = "canary-7Hq2xZ"  # a value a researcher wrote in SQL (refused, but logged)
BY_SEX = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, catalog: Catalog
) -> Iterator[tuple[Path, dict[str, Path]]]:
    work = tmp_path_factory.mktemp("register")
    databases = make_databases(work / "trusts", catalog)
    fed = Federation(work / "fed", make_pki(work / "pki"), databases).start()
    try:
        with fed.client() as client:
            client.query(PROJECT, BY_SEX, epsilon=0.1, query_id="reg-1")
            client.query(PROJECT, BY_SEX, epsilon=0.1, query_id="reg-1")  # replay: no new ε
            client.query(PROJECT, BY_SEX, epsilon=0.2, query_id="reg-2")
            with pytest.raises(UserError):
                client.query(
                    PROJECT,
                    f"SELECT COUNT(*) AS n FROM patients WHERE sex = '{CANARY_SQL}'",
                    epsilon=0.1,
                )
            with pytest.raises(NotReleased):  # refused by every trust itself (tier)
                client.query(
                    PROJECT,
                    "SELECT COUNT(*) AS n FROM conditions WHERE condition_group = 'self_harm'",
                    epsilon=0.1,
                )
    finally:
        fed.stop()
    out = work / "site"
    fed.build_register(out)
    yield out, databases


def test_the_register_says_what_happened(built: tuple[Path, dict[str, Path]]) -> None:
    out, _ = built
    data = json.loads((out / "register.json").read_text())
    (project,) = [p for p in data["projects"] if p["project_id"] == PROJECT]
    assert project["status"] == "approved"
    assert project["purpose"] == "public-benefit-research"
    assert project["service_user_signoff"] is True
    assert {a["role"] for a in project["approvals"]} >= {"service-user", "clinician"}
    assert project["queries_run"] == 2  # the replay is not a new result
    for t in project["trusts"]:
        assert t["queries"] == 2 and t["epsilon_spent"] == pytest.approx(0.3)
    reasons = {r["reason"]: r["requests"] for r in data["refusals"]}
    assert reasons == {"invalid_value": 1, "out_of_scope": 1}
    for path in out.rglob("*.html"):
        html = path.read_text()
        assert "<script" not in html.lower()  # no JavaScript needed
        assert '<html lang="en-GB">' in html and 'name="viewport"' in html
        headings = [int(h) for h in re.findall(r"<h([1-6])", html)]
        assert headings[0] == 1 and all(b - a <= 1 for a, b in itertools.pairwise(headings))


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing on the CI machine (.ci/run installs it)")
        pytest.skip("Debian's chromium is not installed: apt-get install chromium")
    return found


def _render(page: Path, tmp_path: Path, width: int) -> tuple[str, Path]:
    chromium = _chromium()
    profile = tmp_path / f"profile-{width}"
    shot = tmp_path / f"{page.stem}-{width}.png"
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    done = subprocess.run(
        [*common, f"--window-size={width},1400", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    return dom.stdout, shot


def _png_is_not_blank(path: Path) -> bool:
    """Decode the PNG's pixels (8-bit RGB/RGBA, as Chromium writes them) and check that some
    are neither white nor one flat colour."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 3
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, _depth, colour = struct.unpack(">IIBB", body[:10])
            channels = 4 if colour == 6 else 3
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels + 1
    pixels = {raw[r * stride + 1 : (r + 1) * stride] for r in range(0, height, 7)}
    dark = sum(1 for row in pixels for b in row[::channels] if b < 128)
    return len(pixels) > 10 and dark > 100


@pytest.mark.parametrize("width", [1200, 390], ids=["desktop", "phone"])
def test_the_register_renders_in_chromium(
    built: tuple[Path, dict[str, Path]], tmp_path: Path, width: int
) -> None:
    out, _ = built
    dom, shot = _render(out / "projects" / f"{PROJECT}.html", tmp_path, width)
    data = json.loads((out / "register.json").read_text())
    (project,) = [p for p in data["projects"] if p["project_id"] == PROJECT]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
    assert project["lay_summary"] in text
    assert "Research for public benefit" in text
    assert "Service user" in text and "Clinician" in text
    assert "Service-user sign-off: Yes" in text
    assert "0.3 of 50" in text  # ε spent of the budget, at each trust
    assert _png_is_not_blank(shot)
    index, index_shot = _render(out / "index.html", tmp_path, width)
    assert "How patient data is used" in index and _png_is_not_blank(index_shot)


def test_no_value_from_the_data_appears_in_any_generated_file(
    built: tuple[Path, dict[str, Path]],
) -> None:
    out, databases = built
    canaries = {CANARY_SQL}
    pooled: dict[str, int] = {}
    for path in databases.values():
        con = duckdb.connect(str(path), read_only=True)
        try:
            canaries |= {
                str(r[0]) for r in con.execute("SELECT person_id FROM patients").fetchall()
            }
            for sex, n in con.execute("SELECT sex, COUNT(*) FROM patients GROUP BY sex").fetchall():
                if n >= 100:  # the exact answer, before noise, at this trust (smaller
                    canaries.add(str(n))  # numbers could appear in the register by chance)
                pooled[sex] = pooled.get(sex, 0) + n
        finally:
            con.close()
    canaries |= {str(n) for n in pooled.values() if n >= 100}  # ... and over all trusts
    assert all(not c.isdigit() or int(c) >= 100 for c in canaries)  # none collide by chance
    found = []
    for path in out.rglob("*"):
        if path.is_file():
            words = set(re.findall(r"[A-Za-z0-9-]+", path.read_text(encoding="utf-8")))
            found += [(path.name, c) for c in canaries if c in words]
    assert not found, found
