"""The asset graph as committed: every asset's deps, group, kinds, partitions and checks, and every
job, sensor and schedule, compared with tests/dagster/snapshots/asset_graph.json.

A change to the graph shows up here as a diff; when it is intended, rewrite the snapshot with
`UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/dagster/test_graph_snapshot.py` and commit it.
"""

import difflib
import json
import os
from pathlib import Path

from lifecycle_dagster.definitions import defs

SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "asset_graph.json"


def describe_graph() -> dict:
    d = defs()
    graph = d.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        partitions = node.partitions_def
        assets[key.to_user_string()] = {
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "group": node.group_name,
            "kinds": sorted(node.kinds),
            "partitions": (
                None
                if partitions is None
                else getattr(partitions, "name", None) or type(partitions).__name__
            ),
            # check name -> blocking (sorted by name when rendered)
            "checks": {c.name: graph.get_check_spec(c).blocking for c in node.check_keys},
        }
    return {
        "assets": assets,
        "jobs": sorted(j.name for j in d.resolve_all_job_defs() if not j.name.startswith("__")),
        "sensors": sorted(s.name for s in d.sensors or []),
        "schedules": sorted(s.name for s in d.schedules or []),
    }


def render(description: dict) -> str:
    return json.dumps(description, indent=2, sort_keys=True) + "\n"


def test_asset_graph_matches_the_committed_snapshot():
    current = render(describe_graph())
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(current)
        print(f"UPDATE_SNAPSHOTS=1: wrote {SNAPSHOT}")
        return
    assert SNAPSHOT.exists(), (
        f"{SNAPSHOT} is missing; create it with UPDATE_SNAPSHOTS=1 "
        "(.venv/bin/python -m pytest tests/dagster/test_graph_snapshot.py) and commit it"
    )
    committed = SNAPSHOT.read_text()
    diff = "".join(
        difflib.unified_diff(
            committed.splitlines(keepends=True),
            current.splitlines(keepends=True),
            fromfile=f"{SNAPSHOT.name} (committed)",
            tofile=f"{SNAPSHOT.name} (current graph)",
        )
    )
    assert current == committed, (
        "the asset graph differs from the committed snapshot:\n"
        f"{diff}\n"
        "If the change is intended, rewrite the snapshot with UPDATE_SNAPSHOTS=1 "
        ".venv/bin/python -m pytest tests/dagster/test_graph_snapshot.py and commit it."
    )
    # The snapshot is not empty by accident: the graph it pins holds the lifecycle.
    graph = json.loads(committed)
    assert "use_case" in graph["assets"] and "lifecycle_job" in graph["jobs"]
