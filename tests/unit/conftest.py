"""Fixtures of the unit tier: a tiny base model pre-trained once per session."""

from pathlib import Path

import pytest

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
