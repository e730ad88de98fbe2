"""The federation catalog: research views, their columns, public domains, bounds and tiers.

The catalog is one TOML file, identical at every trust. It is the only source of identifiers that
ever reach SQL at a node, the only source of bounds (and so of sensitivity) and of group domains.
Anything unexpected in the file is refused at start-up with a message naming the place.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fedtre.errors import ConfigError

IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,62}\Z")
MAX_GROUP_RANGE = 256
PERSON_ID = "person_id"

Value = str | int | bool


@functools.total_ordering
class Tier(Enum):
    """Sensitivity tiers, lowest first. Mental-health data is never 'general'."""

    GENERAL = "general"
    MENTAL_HEALTH = "mental_health"
    HIGHLY_SENSITIVE = "highly_sensitive"

    @property
    def rank(self) -> int:
        return _TIER_ORDER.index(self)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Tier):
            return NotImplemented
        return self.rank < other.rank


_TIER_ORDER = (Tier.GENERAL, Tier.MENTAL_HEALTH, Tier.HIGHLY_SENSITIVE)


class ColumnType(Enum):
    CATEGORY = "category"
    INTEGER = "integer"
    BOOLEAN = "boolean"


@dataclass(frozen=True)
class Column:
    name: str
    type: ColumnType
    tier: Tier
    description: str = ""
    domain: tuple[Value, ...] = ()
    lower: int | None = None
    upper: int | None = None
    value_tiers: Mapping[Value, Tier] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def group_domain(self) -> tuple[Value, ...] | None:
        """Every cell a GROUP BY on this column returns, in order; None if not group-able."""
        if self.type is ColumnType.INTEGER:
            assert self.lower is not None and self.upper is not None
            if self.upper - self.lower + 1 > MAX_GROUP_RANGE:
                return None
            return tuple(range(self.lower, self.upper + 1))
        return self.domain

    @property
    def magnitude(self) -> int:
        """Largest absolute value a clamped value of this column can take."""
        if self.type is not ColumnType.INTEGER:
            raise ValueError(f"column {self.name} is not numeric")
        assert self.lower is not None and self.upper is not None
        return max(abs(self.lower), abs(self.upper))

    def tier_of(self, value: Value) -> Tier:
        return max(self.tier, self.value_tiers.get(value, Tier.GENERAL))

    @property
    def highest_tier(self) -> Tier:
        return max([self.tier, *self.value_tiers.values()])

    def group_domain_at(self, tier: Tier) -> tuple[Value, ...] | None:
        """The cells a GROUP BY returns for a project approved up to ``tier``: values above it
        are not in the domain (their rows do not exist for that project)."""
        domain = self.group_domain
        if domain is None:
            return None
        return tuple(v for v in domain if self.value_tiers.get(v, Tier.GENERAL) <= tier)


@dataclass(frozen=True)
class View:
    name: str
    description: str
    max_rows_per_person: int
    tier: Tier
    columns: Mapping[str, Column]

    def column(self, name: str) -> Column | None:
        return self.columns.get(name)

    @property
    def row_levels(self) -> tuple[Tier, ...]:
        """The tiers at which the set of rows a project sees changes, lowest first.

        A row's tier is the highest value tier among its values (e.g. a self-harm diagnosis is
        highly sensitive). A project approved up to tier T sees the rows whose tier is at most
        T: the others do not exist for it. The loader stores a per-person rank for each level.
        """
        raised = {t for c in self.columns.values() for t in c.value_tiers.values() if t > self.tier}
        return tuple(sorted({self.tier, *raised}))

    def level_for(self, tier: Tier) -> Tier | None:
        """The row level a project approved up to ``tier`` reads; None if the view is above it."""
        levels = [level for level in self.row_levels if level <= tier]
        return max(levels) if levels else None


@dataclass(frozen=True)
class Catalog:
    version: str
    privacy_unit: str
    views: Mapping[str, View]
    digest: str
    reference_date: dt.date  # ages are computed at this date at every trust
    text: str = field(default="", repr=False, compare=False)  # the file as read (TOML)
    # Records a patient disputes (``fedtre node dispute``): "exclude" (default: the person
    # does not exist for a query reading that view) or "count" (used as recorded).
    disputed_records: str = "exclude"

    def view(self, name: str) -> View | None:
        return self.views.get(name)


def load_catalog(path: Path | str | None = None) -> Catalog:
    """Read and validate a catalog file; ``None`` reads the catalog shipped with fedtre."""
    if path is None:
        raw = resources.files("fedtre").joinpath("data/catalog.toml").read_bytes()
        source = "built-in catalog"
    else:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read catalog {path}: {exc.strerror}") from exc
        source = str(path)
    return catalog_from_bytes(raw, source)


def catalog_from_bytes(raw: bytes, source: str) -> Catalog:
    """Parse and validate a catalog file's bytes (e.g. as a coordinator sent them)."""
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    catalog = parse_catalog(data, source=source, digest=hashlib.sha256(raw).hexdigest())
    return replace(catalog, text=text)


def parse_catalog(data: Mapping[str, Any], source: str = "catalog", digest: str = "") -> Catalog:
    _keys(
        data,
        source,
        required={"version", "views", "reference_date"},
        optional={"privacy_unit", "disputed_records"},
    )
    disputed = data.get("disputed_records", "exclude")
    if disputed not in ("exclude", "count"):
        raise ConfigError(f"{source}: disputed_records must be 'exclude' or 'count'")
    version = _str(data["version"], f"{source}: version")
    reference_date = _date(data["reference_date"], f"{source}: reference_date")
    privacy_unit = data.get("privacy_unit", PERSON_ID)
    if privacy_unit != PERSON_ID:
        raise ConfigError(f"{source}: privacy_unit must be '{PERSON_ID}'")
    views_raw = data["views"]
    if not isinstance(views_raw, dict) or not views_raw:
        raise ConfigError(f"{source}: 'views' must declare at least one view")
    views = {
        name: _parse_view(name, spec, f"{source}: views.{name}") for name, spec in views_raw.items()
    }
    return Catalog(
        version,
        privacy_unit,
        MappingProxyType(views),
        digest,
        reference_date,
        disputed_records=disputed,
    )


def _parse_view(name: str, spec: Any, where: str) -> View:
    _identifier(name, where)
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a table")
    _keys(
        spec, where, required={"max_rows_per_person", "tier", "columns"}, optional={"description"}
    )
    cap = spec["max_rows_per_person"]
    if not isinstance(cap, int) or isinstance(cap, bool) or not 1 <= cap <= 1000:
        raise ConfigError(f"{where}: max_rows_per_person must be a whole number from 1 to 1000")
    cols_raw = spec["columns"]
    if not isinstance(cols_raw, dict) or not cols_raw:
        raise ConfigError(f"{where}: 'columns' must declare at least one column")
    columns = {
        cname: _parse_column(cname, cspec, f"{where}.columns.{cname}")
        for cname, cspec in cols_raw.items()
    }
    return View(
        name=name,
        description=_str(spec.get("description", ""), f"{where}.description", empty_ok=True),
        max_rows_per_person=cap,
        tier=_tier(spec["tier"], f"{where}.tier"),
        columns=MappingProxyType(columns),
    )


def _parse_column(name: str, spec: Any, where: str) -> Column:
    _identifier(name, where)
    if name == PERSON_ID:
        raise ConfigError(f"{where}: '{PERSON_ID}' is the privacy unit and cannot be a column")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a table")
    try:
        ctype = ColumnType(spec.get("type"))
    except ValueError:
        kinds = ", ".join(t.value for t in ColumnType)
        raise ConfigError(f"{where}.type: must be one of {kinds}") from None
    optional = {"description", "value_tiers"}
    domain: tuple[Value, ...]
    if ctype is ColumnType.CATEGORY:
        _keys(spec, where, required={"type", "tier", "domain"}, optional=optional)
        domain = _domain(spec["domain"], f"{where}.domain")
        lower = upper = None
    elif ctype is ColumnType.INTEGER:
        _keys(spec, where, required={"type", "tier", "min", "max"}, optional={"description"})
        lower, upper = spec["min"], spec["max"]
        for bound_name, bound in (("min", lower), ("max", upper)):
            if not isinstance(bound, int) or isinstance(bound, bool) or abs(bound) > 10**9:
                raise ConfigError(
                    f"{where}.{bound_name}: must be a whole number within ±1,000,000,000"
                )
        if lower >= upper:
            raise ConfigError(f"{where}: min must be below max")
        domain = ()
    else:
        _keys(spec, where, required={"type", "tier"}, optional=optional)
        domain, lower, upper = (False, True), None, None
    value_tiers: dict[Value, Tier] = {}
    for value, tier in dict(spec.get("value_tiers", {})).items():
        key: Value = (
            {"true": True, "false": False}.get(value, value)
            if ctype is ColumnType.BOOLEAN
            else value
        )
        if key not in domain:
            raise ConfigError(f"{where}.value_tiers: '{value}' is not in the column's domain")
        value_tiers[key] = _tier(tier, f"{where}.value_tiers.{value}")
    return Column(
        name=name,
        type=ctype,
        tier=_tier(spec["tier"], f"{where}.tier"),
        description=_str(spec.get("description", ""), f"{where}.description", empty_ok=True),
        domain=domain,
        lower=lower,
        upper=upper,
        value_tiers=MappingProxyType(value_tiers),
    )


def _domain(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw or len(raw) > 1000:
        raise ConfigError(f"{where}: must be a list of 1 to 1000 values")
    for value in raw:
        if not isinstance(value, str) or not value or len(value) > 64 or not value.isprintable():
            raise ConfigError(f"{where}: values must be short printable strings")
    if len(set(raw)) != len(raw):
        raise ConfigError(f"{where}: values must be distinct")
    return tuple(raw)


def _keys(spec: Mapping[str, Any], where: str, required: set[str], optional: set[str]) -> None:
    unknown = sorted(set(spec) - required - optional)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    missing = sorted(required - set(spec))
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")


def _identifier(name: str, where: str) -> None:
    if not IDENTIFIER.match(name):
        raise ConfigError(
            f"{where}: names must be lower-case letters, digits and _, starting with a letter"
        )


def _tier(raw: Any, where: str) -> Tier:
    try:
        return Tier(raw)
    except ValueError:
        tiers = ", ".join(t.value for t in Tier)
        raise ConfigError(f"{where}: must be one of {tiers}") from None


def _date(raw: Any, where: str) -> dt.date:
    """A calendar date, written as a TOML date (2025-03-31) or a string "2025-03-31"."""
    if isinstance(raw, dt.date) and not isinstance(raw, dt.datetime):
        return raw
    if isinstance(raw, str):
        try:
            return dt.date.fromisoformat(raw)
        except ValueError:
            pass
    raise ConfigError(f"{where}: must be a date written YYYY-MM-DD")


def _str(raw: Any, where: str, empty_ok: bool = False) -> str:
    if not isinstance(raw, str) or (not raw and not empty_ok):
        raise ConfigError(f"{where}: must be a {'' if empty_ok else 'non-empty '}string")
    return raw
