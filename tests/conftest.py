"""Shared fixtures. The whole session writes its state under one temporary LIFECYCLE_HOME."""

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

TINY = {
    "vocab_size": 400,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 128,
    "context_length": 256,
}


@pytest.fixture(scope="session")
def state_home() -> Path:
    return Path(_HOME)


@pytest.fixture(scope="session")
def runtime():
    return select_runtime("cpu", torch_threads=2, ort_threads=1)


@pytest.fixture(scope="session")
def use_case():
    from lifecycle_dagster.ml.usecase import load_use_case

    return load_use_case(profile="tiny")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, use_case, runtime) -> Path:
    """A 2-layer Llama (hidden 64) with its own BPE tokenizer, briefly pre-trained on the corpus."""
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
