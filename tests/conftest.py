"""Shared fixtures and the test tiers. The whole session writes its state under one temporary
LIFECYCLE_HOME.

Tiers, by folder: tests/unit (plain ml/ code on tiny models, seconds), tests/dagster (direct calls
of assets, checks, sensors and the definitions), tests/e2e (the whole graph, the CLI, the daemon).
Each test gets its tier's marker from its folder, so `-m "not e2e"` selects the fast tiers."""

import os
import tempfile
from pathlib import Path

_HOME = tempfile.mkdtemp(prefix="lifecycle-test-")
os.environ["LIFECYCLE_HOME"] = _HOME
os.environ["DAGSTER_HOME"] = str(Path(_HOME) / "dagster")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("LIFECYCLE_ENV", None)

import pytest  # noqa: E402

from lifecycle_dagster.ml.runtime import select_runtime  # noqa: E402

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "dagster", "e2e")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(item.path).resolve()
        tier = path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else None
        if tier not in TIERS:
            raise pytest.UsageError(
                f"{path}: every test lives in a tier, tests/{{{','.join(TIERS)}}}/"
            )
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def state_home() -> Path:
    return Path(_HOME)


@pytest.fixture(scope="session")
def runtime():
    return select_runtime("cpu", torch_threads=2, ort_threads=1)


@pytest.fixture(scope="session")
def use_case():
    from lifecycle_dagster.ml.usecase_loader import load_use_case

    return load_use_case(profile="tiny")
