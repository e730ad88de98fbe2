"""Release records: what was released, under which approval, with which mechanism and noise.

Machine-readable, one per released result (SATRE 3.3.09): at a trust it is part of the
``query.released`` audit entry, committed with the ledger's final debit; at the coordinator it
adds the output rules applied and which trusts answered. A record never holds a released
value, only how values were made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedtre import __version__
from fedtre.result import NodeResult

RECORD_VERSION = 1


def trust_release(result: NodeResult, plan: str, approval: str) -> dict[str, Any]:
    """A trust's release record (no values): ``plan`` is the query plan's hash."""
    return {
        "record": RECORD_VERSION,
        "software": f"fedtre {__version__}",
        "catalog_version": result.catalog_version,
        "reference_date": result.reference_date,
        "data_as_of": result.data_as_of,
        "approval": approval,
        "plan": plan,
        "view": result.view,
        "group_by": list(result.group_by),
        "cells": len(result.cells),
        "epsilon_units": result.epsilon_units,
        "released_at": result.released_at,
        "aggregates": [
            {
                "alias": a.alias,
                "kind": a.kind.value,
                "column": a.column,
                "lower": a.lower,
                "upper": a.upper,
                "measurements": [
                    {
                        "statistic": s.kind,
                        "mechanism": s.mechanism,
                        "sensitivity": s.sensitivity,
                        "noise_scale": s.noise_scale,
                        "epsilon_units": s.epsilon_units,
                    }
                    for s in a.statistics
                ],
            }
            for a in result.aggregates
        ],
    }


def coordinator_release(
    results: Mapping[str, NodeResult],
    states: Mapping[str, str],
    replayed: Sequence[str],
    approval: str,
    plan: str,
    epsilon_units: int,
    output_rules: Mapping[str, Any],
) -> dict[str, Any]:
    """The coordinator's release record: the trusts' records combined, with the output rules
    it applied. ``results``: the answers combined, by trust; ``states``: every trust's state."""
    first = next(iter(results.values()))
    shared = trust_release(first, plan, approval)
    del shared["data_as_of"], shared["released_at"]
    return {
        **shared,
        "epsilon_units": epsilon_units,  # per trust that answered
        "output_rules": dict(output_rules),
        "trusts": {
            node: {
                "state": state,
                "replayed": node in replayed,
                "data_as_of": results[node].data_as_of if node in results else "",
                "released_at": results[node].released_at if node in results else "",
            }
            for node, state in sorted(states.items())
        },
    }
