"""An application as a researcher writes it (TOML), checked against the federation catalog.

Example (``fedtre project submit --registry DIR application.toml``)::

    project_id = "depression-prevalence"
    title = "Depression prevalence by age band"
    lay_summary = "How common is depression in people under 25, and is it changing?"
    purpose = "public-benefit-research"      # or nhs-service-evaluation, commercial
    organisation = "University of Leeds"
    organisation_type = "university"         # nhs, university, charity, government, company
    researchers = ["alice"]                  # their certificate names
    views = ["patients", "conditions"]
    max_tier = "mental_health"               # general, mental_health, highly_sensitive
    trusts = ["trust-a", "trust-b"]
    epsilon_per_trust = 3.0
    max_epsilon_per_query = 1.0
    default_epsilon = 0.1                    # optional (0.1)
    allow_partial = false                    # optional (false: every trust must answer)
    suppress_below = 10                      # optional (10)
    round_to = 5                             # optional (5)
    expires = 2027-12-31
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from fedtre.catalog import Catalog
from fedtre.errors import ConfigError
from fedtre.governance.documents import (
    APPLICATION_FIELDS,
    Application,
    DocumentError,
    canonical,
    timestamp,
)
from fedtre.settings import check_keys

DEFAULTS: Mapping[str, Any] = {
    "default_epsilon": 0.1,
    "allow_partial": False,
    "suppress_below": 10,
    "round_to": 5,
}
# Everything an application holds, less what the form may leave out or the tool adds.
REQUIRED = set(APPLICATION_FIELDS) - {"kind", "submitted"} - set(DEFAULTS)


def application_from_form(
    form: Mapping[str, Any], catalog: Catalog, now: dt.datetime, source: str
) -> Application:
    check_keys(form, source, REQUIRED, REQUIRED | set(DEFAULTS))
    fields = {**DEFAULTS, **form}
    expires = fields["expires"]
    if isinstance(expires, dt.datetime) or not isinstance(expires, dt.date):
        raise ConfigError(f"{source}: expires is a date, e.g. 2027-12-31 (no quotes)")
    if expires <= now.date():
        raise ConfigError(f"{source}: expires must be a future date")
    fields["expires"] = expires.isoformat()
    fields["submitted"] = timestamp(now)
    fields["kind"] = "fedtre.application/1"
    try:
        app = Application.from_bytes(canonical(fields))
    except DocumentError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    unknown = sorted(set(app.views) - set(catalog.views))
    if unknown:
        raise ConfigError(f"{source}: views not in the catalog: {', '.join(unknown)}")
    return app
