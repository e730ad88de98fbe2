"""The catalog for people and machines: every view, its columns, their domains or bounds, and
the sensitivity tier of each (and of each value that is more sensitive than its column)."""

from __future__ import annotations

from typing import Any

from fedtre.catalog import Catalog, Column, ColumnType


def catalog_document(catalog: Catalog) -> dict[str, Any]:
    return {
        "version": catalog.version,
        "digest": catalog.digest,
        "reference_date": catalog.reference_date.isoformat(),
        "views": [
            {
                "view": view.name,
                "description": view.description,
                "tier": view.tier.value,
                "max_rows_per_person": view.max_rows_per_person,
                "columns": [_column(c) for c in view.columns.values()],
            }
            for view in catalog.views.values()
        ],
    }


def _column(c: Column) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "column": c.name,
        "type": c.type.value,
        "tier": c.tier.value,
        "description": c.description,
    }
    if c.type is ColumnType.INTEGER:
        doc["bounds"] = [c.lower, c.upper]
    elif c.domain:
        doc["domain"] = list(c.domain)
    if c.value_tiers:
        doc["value_tiers"] = {str(v): t.value for v, t in c.value_tiers.items()}
    return doc


def catalog_text(catalog: Catalog) -> str:
    lines = [
        f"Catalog {catalog.version} (sha256 {catalog.digest[:16]}…); ages at "
        f"{catalog.reference_date.isoformat()}. Tiers: general < mental_health < "
        "highly_sensitive; a project sees only what its approved tier allows.",
    ]
    for view in catalog.views.values():
        lines += [
            "",
            f"{view.name} ({view.tier.value}; at most {view.max_rows_per_person} row(s) per "
            f"person per query){': ' + view.description if view.description else ''}",
        ]
        for c in view.columns.values():
            if c.type is ColumnType.INTEGER:
                values = f"{c.lower} to {c.upper}"
            elif c.domain:
                values = ", ".join(
                    str(v) + (f" [{c.value_tiers[v].value}]" if v in c.value_tiers else "")
                    for v in c.domain
                )
            else:
                values = "true, false" if c.type is ColumnType.BOOLEAN else ""
            lines.append(f"  {c.name:<22} {c.type.value:<9} {c.tier.value:<16} {values}")
    return "\n".join(lines)
