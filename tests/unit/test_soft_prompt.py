"""Prompt tuning as a rung of the graph: the soft prompt trains, bakes into the vocabulary exactly,
survives saving, is never generated, and runs in onnxruntime and behind the server."""

import json

import numpy as np
import pytest

from lifecycle_dagster.ml.data import EvalSplit, format_prompt, load_task_data, sft_records
from lifecycle_dagster.ml.evaluate import generate
from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer
from lifecycle_dagster.ml.soft_prompt import (
    soft_prefix,
    soft_prompt_ids,
    strip_soft_prompt,
    with_soft_prompt,
)

VIRTUAL = 8


@pytest.fixture(scope="module")
def rows(use_case):
    data = load_task_data(use_case)
    return data["train"].rows, data["eval"].rows


@pytest.fixture(scope="module")
def prompt_tuned(tmp_path_factory, tiny_base, use_case, rows, runtime):
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


@pytest.fixture(scope="module")
def prompts(use_case, rows):
    return [format_prompt(use_case, r["dialogue"]) for r in rows[1][:8]]


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


def test_baked_model_exports_to_onnx_matches_and_is_served(
    tmp_path, prompt_tuned, tiny_base, use_case, rows, prompts, runtime
):
    """Saved and reloaded, the prompt-tuned model keeps its soft prompt; its ONNX export masks the
    soft tokens' logits, matches PyTorch, and the server prompts it with the soft prompt."""
    from lifecycle_dagster.ml.compress import CompressConfig, compress
    from lifecycle_dagster.ml.export import SUPPRESSED_LOGIT
    from lifecycle_dagster.ml.runtimes import OrtDecoder
    from lifecycle_dagster.ml.sft import load_sft
    from lifecycle_dagster.serving import GenerateRequest, ServedModel

    baked, tok = load_sft(tiny_base, prompt_tuned[0], runtime)
    model_dir = tmp_path / "model"
    baked.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    reloaded, tok = load_causal_lm(model_dir, runtime), load_tokenizer(model_dir)
    ids = soft_prompt_ids(tok)
    assert len(ids) == VIRTUAL and list(reloaded.generation_config.suppress_tokens) == ids
    torch_text = generate(reloaded, tok, prompts[:4], max_new_tokens=12)

    out = tmp_path / "onnx"
    out.mkdir()
    result = compress(
        model_dir,
        out,
        CompressConfig(
            variants=["fp32", "int4", "int8_dynamic"],
            block_size=16,
            max_metric_drop=1.0,
            max_new_tokens=8,
        ),
        runtime=runtime,
        max_new_tokens=12,
        check_prompts=prompts[:2],
        split=EvalSplit(use_case, rows[1][:4]),
        serving={
            "prompt_template": use_case.task.prompt_template,
            "instruction": use_case.task.instruction,
            "max_new_tokens": 12,
        },
    )
    fp32 = result.variants["fp32"].faithfulness
    assert fp32.max_abs_logit_diff < 1e-3 and fp32.token_agreement == 1.0
    assert result.fp32_matches and result.cache_in_use
    assert result.variants["fp32"].predictions == torch_text
    for variant in ("fp32", "int4", "int8_dynamic"):
        logits = OrtDecoder(out / variant).prefill_logits(
            tok(with_soft_prompt(tok, prompts[:1])[0], add_special_tokens=False)["input_ids"]
        )
        assert logits.shape[-1] == len(tok)
        assert (logits[:, ids] < SUPPRESSED_LOGIT / 2).all()
        assert np.isfinite(logits).all()

    served = ServedModel.from_artifact(out, "m", "1", "candidate")
    row = rows[1][0]
    answer = served.generate(GenerateRequest(input=row["dialogue"]))
    plain = len(tok(prompts[0], add_special_tokens=False)["input_ids"])
    assert answer.prompt_tokens == plain + VIRTUAL and answer.text
    # What the server's generator writes, token by token, past EOS: never a soft-prompt token.
    for prompt in with_soft_prompt(tok, prompts[:4]):
        ids_in = served.tokenizer.encode(prompt, add_special_tokens=False).ids
        assert ids_in[:VIRTUAL] == ids
        written = served.generator.generate(ids_in, 24, ignore_eos=True, keep=VIRTUAL)
        assert len(written) == 24 and not set(ids) & set(written)


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
