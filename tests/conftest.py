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
# Heavy steps train in the test's own process (a child process per step would mostly re-import
# torch); tests/e2e/test_pipes.py and the deployment test run them through Dagster Pipes.
os.environ["LIFECYCLE_TRAINING"] = "in_process"
# Under pytest-xdist (`make test`) the workers share the machine: each one's torch and
# onnxruntime, and the processes its tests start, take a share of the cores rather than all.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import pytest  # noqa: E402
from tiny import TINY, VIRTUAL  # noqa: E402

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


# The longest module (tens of minutes, mostly waiting on its servers) starts first, so that with
# `pytest -n 2 --dist loadfile --no-loadscope-reorder` (`make test`) one worker runs it while the
# other takes every other file.
FIRST = ("e2e/test_deployment.py",)


# A wrapper around pytest-randomly's shuffle, so this sort comes after it.
@pytest.hookimpl(wrapper=True, tryfirst=True, specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_longest_first(config, items):
    result = yield
    first = {TESTS / f for f in FIRST}
    items.sort(key=lambda item: Path(item.path).resolve() not in first)  # stable: order kept
    return result


@pytest.fixture(scope="session")
def state_home() -> Path:
    return Path(_HOME)


@pytest.fixture(scope="session")
def runtime():
    return select_runtime("cpu", ort_threads=1)  # torch: the cores this process may use


@pytest.fixture(scope="session")
def use_case():
    from lifecycle_dagster.ml.usecase_loader import load_use_case

    return load_use_case(profile="tiny")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, use_case, runtime) -> Path:
    """Pre-trained once per session (the unit tier's, the exports' and the distributed test's):
    a 2-layer Llama (hidden 64) with its own BPE tokenizer, briefly pre-trained on the corpus."""
    from lifecycle_dagster.ml.data import load_task_data
    from lifecycle_dagster.ml.pretrain import PretrainConfig, pretrain

    rows = load_task_data(use_case)["train"].rows
    corpus = [r["dialogue"] for r in rows] + [r["summary"] for r in rows]
    out = tmp_path_factory.mktemp("tiny_base")
    result = pretrain(
        corpus, out, PretrainConfig(**TINY, steps=120, batch_size=16), device=runtime.device
    )
    assert result.loss_end < result.loss_start
    return out


@pytest.fixture(scope="session")
def rows(use_case):
    """The tiny use case's train and eval rows."""
    from lifecycle_dagster.ml.data import load_task_data

    data = load_task_data(use_case)
    return data["train"].rows, data["eval"].rows


@pytest.fixture(scope="session")
def prompt_tuned(tmp_path_factory, tiny_base, use_case, rows, runtime):
    """A soft prompt of VIRTUAL tokens trained on ``tiny_base``: its folder and SFTResult."""
    from lifecycle_dagster.ml.data import sft_records
    from lifecycle_dagster.ml.sft import SFTMethodConfig, train_sft

    out = tmp_path_factory.mktemp("prompt_tuning")
    result = train_sft(
        tiny_base,
        sft_records(use_case, rows[0]),
        out,
        SFTMethodConfig(
            method="prompt_tuning",
            max_steps=30,
            learning_rate=3e-2,
            num_virtual_tokens=VIRTUAL,
        ),
        runtime,
        init_text=use_case.task.instruction,
    )
    return out, result


@pytest.fixture(scope="session")
def prompts(use_case, rows):
    from lifecycle_dagster.ml.data import format_prompt

    return [format_prompt(use_case, r["dialogue"]) for r in rows[1][:8]]
