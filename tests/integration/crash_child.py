"""Child process for test_crash.py: answers queries in a loop until it is killed.

Usage: python crash_child.py CONFIG_PATH ID_PREFIX

Prints ``READY`` once the engine is open, then, after each ``answer`` returns, one JSON line
``{"query_id", "sql", "epsilon", "result"}`` where ``result`` is the released NodeResult's JSON.
"""

from __future__ import annotations

import itertools
import json
import sys

from fedtre.request import QueryRequest
from node.config import load_node_config
from node.engine import NodeEngine

EPSILON = 0.01
QUERIES = (
    "SELECT COUNT(*) AS n FROM patients",
    "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex",
    "SELECT condition_group, COUNT(DISTINCT person_id) AS persons FROM conditions "
    "GROUP BY condition_group",
    "SELECT visit_type, AVG(length_of_stay) AS los FROM visits GROUP BY visit_type",
)


def main() -> None:
    config_path, prefix = sys.argv[1], sys.argv[2]
    engine = NodeEngine(load_node_config(config_path))
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    for i in itertools.count():
        query_id = f"{prefix}-{i}"
        sql = QUERIES[i % len(QUERIES)]
        result = engine.answer(QueryRequest(query_id, "study", sql, EPSILON, "crash-test"))
        line = {"query_id": query_id, "sql": sql, "epsilon": EPSILON, "result": result.to_json()}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
