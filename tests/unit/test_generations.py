"""Generations kept by weights and prompts: a model answers a split once; other weights, other
prompts, another budget or a model in training mode generate again."""

import torch

from lifecycle_dagster.ml import generations
from lifecycle_dagster.ml.evaluate import generate
from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer


def counting(model):
    """``model`` whose ``generate`` counts its calls."""
    calls = []
    real = model.generate

    def generate_(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    model.generate = generate_
    return calls


def test_a_model_answers_the_same_prompts_once(tiny_base, runtime, prompts, monkeypatch, tmp_path):
    monkeypatch.setenv("LIFECYCLE_HOME", str(tmp_path))
    model, tok = load_causal_lm(tiny_base, runtime), load_tokenizer(tiny_base)
    calls = counting(model)
    first = generate(model, tok, prompts, max_new_tokens=8, batch_size=4)
    assert len(calls) == 2  # two batches of four
    again = generate(model, tok, prompts, max_new_tokens=8, batch_size=4)
    assert again == first and len(calls) == 2
    assert len(list((tmp_path / "cache" / "generations").glob("*.json"))) == 1

    # Another budget, other prompts: generated.
    generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    generate(model, tok, prompts[:4], max_new_tokens=8, batch_size=4)
    assert len(calls) == 2 + 2 + 1

    # The same architecture loaded afresh hits; one changed weight misses.
    fresh = load_causal_lm(tiny_base, runtime)
    fresh_calls = counting(fresh)
    assert generate(fresh, tok, prompts, max_new_tokens=8, batch_size=4) == first
    assert fresh_calls == []
    with torch.no_grad():
        next(fresh.parameters()).view(-1)[0] += 1.0
    generate(fresh, tok, prompts, max_new_tokens=8, batch_size=4)
    assert len(fresh_calls) == 2


def test_training_mode_and_a_disabled_cache_generate_every_time(
    tiny_base, runtime, prompts, monkeypatch, tmp_path
):
    monkeypatch.setenv("LIFECYCLE_HOME", str(tmp_path))
    model, tok = load_causal_lm(tiny_base, runtime), load_tokenizer(tiny_base)
    calls = counting(model)
    model.train()
    for _ in range(2):
        generate(model, tok, prompts[:2], max_new_tokens=4, batch_size=2)
    assert len(calls) == 2
    model.eval()
    monkeypatch.setenv("LIFECYCLE_GENERATION_CACHE", "0")
    for _ in range(2):
        generate(model, tok, prompts[:2], max_new_tokens=4, batch_size=2)
    assert len(calls) == 4
    assert generations.cache_dir() is None
    assert not (tmp_path / "cache" / "generations").exists()
