"""Prompt tuning as a rung of the graph: the soft prompt trains, bakes into the vocabulary exactly,
survives saving, is never generated, and runs in onnxruntime and behind the server."""

import json

import pytest
from tiny import VIRTUAL

from lifecycle_dagster.ml.evaluate import generate
from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer
from lifecycle_dagster.ml.soft_prompt import (
    soft_prefix,
    soft_prompt_ids,
    strip_soft_prompt,
    with_soft_prompt,
)


def test_prompt_tuning_trains_only_the_soft_prompt(prompt_tuned, tiny_base):
    _, result = prompt_tuned
    hidden = json.loads((tiny_base / "config.json").read_text())["hidden_size"]
    assert result.loss_end < result.loss_start
    assert result.trainable_parameters == VIRTUAL * hidden


def test_baked_soft_prompt_is_exactly_peft_prompt_tuning(prompt_tuned, tiny_base, prompts, runtime):
    """The soft prompt as tokens gives peft's logits and peft's greedy text, batched with left
    padding; the tokens are added as special tokens and suppressed in generation."""
    import torch

    from lifecycle_dagster.ml.sft import load_sft

    adapter, _ = prompt_tuned
    peft_model = load_causal_lm(tiny_base, runtime, adapter=adapter)
    base_tok = load_tokenizer(tiny_base)
    baked, tok = load_sft(tiny_base, adapter, runtime)

    ids = soft_prompt_ids(tok)
    assert len(ids) == VIRTUAL and ids == list(range(len(base_tok), len(base_tok) + VIRTUAL))
    assert baked.get_input_embeddings().weight.shape[0] == len(base_tok) + VIRTUAL
    assert list(baked.generation_config.suppress_tokens) == ids

    enc = base_tok(prompts[0], return_tensors="pt", add_special_tokens=False)
    prefixed = tok(
        with_soft_prompt(tok, prompts[:1]), return_tensors="pt", add_special_tokens=False
    )
    assert prefixed["input_ids"].shape[1] == enc["input_ids"].shape[1] + VIRTUAL
    with torch.no_grad():
        expected = peft_model(**enc).logits[0, -enc["input_ids"].shape[1] :]
        got = baked(**prefixed).logits[0, VIRTUAL:, : len(base_tok)]
    assert torch.allclose(expected, got, atol=1e-5)

    assert generate(baked, tok, prompts, max_new_tokens=12, batch_size=4) == generate(
        peft_model, base_tok, prompts, max_new_tokens=12, batch_size=4
    )
    with torch.no_grad():
        out = baked.generate(
            **prefixed,
            max_new_tokens=4,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=tok.pad_token_id,
        )
    assert all(torch.isinf(step[0, ids]).all() for step in out.scores)


def test_the_prefix_is_added_once_and_stripped_for_the_reward_model(
    prompt_tuned, tiny_base, runtime
):
    from lifecycle_dagster.ml.sft import load_sft

    _, tok = load_sft(tiny_base, prompt_tuned[0], runtime)
    prefix = soft_prefix(tok)
    assert prefix.startswith("<|soft_prompt_0|>") and prefix.count("<|soft_prompt_") == VIRTUAL
    once = with_soft_prompt(tok, ["Summarise: x"])
    assert once == [prefix + "Summarise: x"] and with_soft_prompt(tok, once) == once
    assert strip_soft_prompt(once[0]) == "Summarise: x"
    assert with_soft_prompt(load_tokenizer(tiny_base), ["p"]) == ["p"]  # no soft prompt, no prefix


def test_a_model_that_scales_its_embeddings_bakes_unscaled_rows(tmp_path, tiny_base, runtime):
    """Gemma multiplies embedding lookups by sqrt(hidden); peft's soft prompt is not scaled, so the
    baked rows are stored divided by that scale and the outputs still match peft's."""
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import GemmaConfig, GemmaForCausalLM

    from lifecycle_dagster.ml.sft import load_sft

    tok = load_tokenizer(tiny_base)
    torch.manual_seed(0)
    config = GemmaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,  # one layer would hide a wrong scale behind its input norm
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        pad_token_id=tok.pad_token_id,
    )
    base = tmp_path / "gemma"
    GemmaForCausalLM(config).save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    peft_model = get_peft_model(
        load_causal_lm(base, runtime),
        PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    assert float(peft_model.get_input_embeddings().embed_scale) == pytest.approx(8.0)

    baked, baked_tok = load_sft(base, tmp_path / "adapter", runtime)
    enc = tok("Summary: hello", return_tensors="pt", add_special_tokens=False)
    prefixed = baked_tok(
        with_soft_prompt(baked_tok, ["Summary: hello"]),
        return_tensors="pt",
        add_special_tokens=False,
    )
    with torch.no_grad():
        expected = peft_model.eval()(**enc).logits[0, -enc["input_ids"].shape[1] :]
        got = baked(**prefixed).logits[0, 4:, : len(tok)]
    assert torch.allclose(expected, got, atol=1e-4)
