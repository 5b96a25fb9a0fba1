"""The shape the house keeps: asset bodies stay short (resolve inputs, one call into ml/, record,
return), and tests reach policy through ml/, never through the Dagster glue in defs/."""

import ast
from pathlib import Path

import dagster as dg

ROOT = Path(__file__).resolve().parents[2]
DEFS = ROOT / "lifecycle_dagster" / "defs"
MAX_BODY = 40


def _bodies():
    for path in sorted(DEFS.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.decorator_list:
                first = node.body[0]
                docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                start = first.end_lineno + 1 if docstring else first.lineno
                yield f"{path.relative_to(ROOT)}:{node.name}", node.end_lineno - start + 1


def test_every_decorated_body_in_defs_is_short():
    bodies = dict(_bodies())
    assert {"lifecycle_dagster/defs/evaluation/assets.py:evaluation"} <= set(bodies)
    long = {name: n for name, n in bodies.items() if n > MAX_BODY}
    assert not long, f"bodies over {MAX_BODY} lines (move the logic to ml/ or lib/): {long}"


def test_tests_import_only_definitions_from_defs():
    import importlib

    kinds = (
        dg.AssetsDefinition,
        dg.SensorDefinition,
        dg.ScheduleDefinition,
        dg.AssetChecksDefinition,
    )
    imported = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "lifecycle_dagster.defs"
            ):
                module = importlib.import_module(node.module)
                imported += [(path.name, a.name, getattr(module, a.name)) for a in node.names]
    assert imported, "expected tests to exercise the sensors through defs/"
    policy = [(f, name) for f, name, obj in imported if not isinstance(obj, kinds)]
    assert not policy, f"tests import plain functions from defs/ (policy belongs in ml/): {policy}"
