"""The ml/ layer on a tiny model: training moves the loss, adapters load, exports match PyTorch."""

import numpy as np
import pytest

from lifecycle_dagster.ml.data import (
    format_prompt,
    load_preference_data,
    load_task_data,
    preference_records,
    sft_records,
)
from lifecycle_dagster.ml.evaluate import RewardScorer, evaluate_model, rouge_l
from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def data(use_case):
    return load_task_data(use_case), load_preference_data(use_case)


def test_tokenizer_round_trips_and_decoder_is_plain_bytelevel(tiny_base):
    import json

    tok = load_tokenizer(tiny_base)
    text = "#Person1#: Hello, I'd like a table for four."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert json.loads((tiny_base / "tokenizer.json").read_text())["decoder"]["type"] == "ByteLevel"


def test_rouge_l_is_one_for_identical_and_lower_otherwise():
    assert rouge_l(["a b c"], ["a b c"]) == [1.0]
    assert rouge_l(["a x c"], ["a b c"])[0] < 1.0


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_sft_loss_falls_and_adapter_loads_and_generates(
    tmp_path, tiny_base, use_case, data, runtime, method
):
    from lifecycle_dagster.ml.sft import SFTMethodConfig, load_sft_model, train_sft

    records = sft_records(use_case, data[0]["train"].rows)
    lr = 3e-3 if method == "lora" else 3e-2
    result = train_sft(
        tiny_base,
        records,
        tmp_path / "adapter",
        SFTMethodConfig(method=method, max_steps=30, learning_rate=lr),
        runtime,
    )
    assert result.loss_end < result.loss_start
    assert 0 < result.trainable_fraction < 0.5
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    model = load_sft_model(tiny_base, tmp_path / "adapter", runtime)
    tok = load_tokenizer(tiny_base)
    res = evaluate_model(
        model,
        tok,
        [format_prompt(use_case, r["dialogue"]) for r in data[0]["eval"].rows[:4]],
        [r["summary"] for r in data[0]["eval"].rows[:4]],
        max_new_tokens=8,
        batch_size=4,
    )
    assert len(res.predictions) == 4 and any(res.predictions)
    assert res.perplexity is not None and np.isfinite(res.perplexity)


def test_full_finetune_beats_base_rouge(tmp_path, tiny_base, use_case, data, runtime):
    from lifecycle_dagster.ml.sft import SFTMethodConfig, load_sft_model, train_sft

    rows = data[0]["eval"].rows[:16]
    prompts = [format_prompt(use_case, r["dialogue"]) for r in rows]
    refs = [r["summary"] for r in rows]
    tok = load_tokenizer(tiny_base)
    before = evaluate_model(
        load_causal_lm(tiny_base, runtime),
        tok,
        prompts,
        refs,
        max_new_tokens=24,
        batch_size=16,
        with_perplexity=False,
    )
    train_sft(
        tiny_base,
        sft_records(use_case, data[0]["train"].rows),
        tmp_path / "full",
        SFTMethodConfig(method="full", max_steps=100, learning_rate=1e-3),
        runtime,
    )
    assert not (tmp_path / "full" / "adapter_config.json").exists()
    after = evaluate_model(
        load_sft_model(tiny_base, tmp_path / "full", runtime),
        tok,
        prompts,
        refs,
        max_new_tokens=24,
        batch_size=16,
        with_perplexity=False,
    )
    assert after.rouge_l > before.rouge_l + 0.05


@pytest.fixture(scope="module")
def tiny_reward(tmp_path_factory, tiny_base, use_case, data, runtime):
    from lifecycle_dagster.ml.reward import RewardMethodConfig, train_reward_model

    out = tmp_path_factory.mktemp("rm")
    train = preference_records(use_case, data[1]["train"].rows)
    result = train_reward_model(tiny_base, train, out, RewardMethodConfig(max_steps=60), runtime)
    return out, result


def test_reward_model_learns_preferences(tiny_reward, use_case, data, runtime):
    from lifecycle_dagster.ml.reward import pairwise_accuracy

    path, result = tiny_reward
    assert result.loss_end < result.loss_start
    held_out = preference_records(use_case, data[1]["eval"].rows)
    accuracy, margin = pairwise_accuracy(RewardScorer(path, runtime), held_out)
    assert accuracy > 0.65 and margin > 0


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_alignment_trains_and_saves_a_merged_model(
    tmp_path, tiny_base, tiny_reward, use_case, data, runtime, method
):
    import torch

    from lifecycle_dagster.ml.align import AlignMethodConfig, align

    policy = load_causal_lm(tiny_base, runtime)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    policy.train()
    rows = data[0]["train"].rows[:32]
    result = align(
        policy,
        load_tokenizer(tiny_base),
        tmp_path / "aligned",
        AlignMethodConfig(method=method, max_steps=3, batch_size=8, learning_rate=1e-3),
        runtime,
        prompts=[format_prompt(use_case, r["dialogue"]) for r in rows],
        pairs=preference_records(use_case, data[1]["train"].rows[:32]),
        scorer=RewardScorer(tiny_reward[0], runtime),
    )
    assert len(result.loss_curve) == 3
    if method == "grpo":
        assert len(result.reward_curve) == 3 and result.mean_kl is not None
    assert not list((tmp_path / "aligned").glob("adapter_*"))  # merged, not an adapter
    aligned = load_causal_lm(tmp_path / "aligned", runtime)
    changed = any(
        not torch.equal(before[k], v) for k, v in aligned.state_dict().items() if k in before
    )
    assert changed


def test_onnx_export_matches_pytorch_and_uses_cache(tmp_path, tiny_base, use_case, data, runtime):
    from lifecycle_dagster.ml.export import (
        ExportConfig,
        OrtDecoder,
        export_onnx,
        verify_against_torch,
    )

    result = export_onnx(tiny_base, tmp_path / "onnx", ExportConfig(quantization="int8"))
    assert set(result.variants) == {"fp32", "int8"}
    assert result.sizes["int8"] < result.sizes["fp32"]
    model, tok = load_causal_lm(tiny_base, runtime), load_tokenizer(tiny_base)
    prompts = [format_prompt(use_case, r["dialogue"]) for r in data[0]["eval"].rows[:2]]
    fp32 = verify_against_torch(
        model,
        tok,
        OrtDecoder(result.variants["fp32"], 1),
        prompts,
        max_new_tokens=8,
        variant="fp32",
    )
    assert fp32.max_abs_logit_diff < 1e-3
    assert fp32.token_agreement == 1.0 and fp32.text_equal == 1.0
    assert fp32.cache_consistent
    int8 = verify_against_torch(
        model,
        tok,
        OrtDecoder(result.variants["int8"], 1),
        prompts,
        max_new_tokens=8,
        variant="int8",
    )
    assert int8.cache_consistent and int8.token_agreement >= 0.5


def test_decoder_refuses_an_export_without_cache_inputs(tmp_path, tiny_base):
    """A model whose graph has no past_key_values inputs is refused, not silently run."""
    import json

    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"])],
        "nocache",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, None]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, [1, None])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        tmp_path / "model.onnx",
    )
    (tmp_path / "genai_config.json").write_text(
        json.dumps(
            {
                "model": {
                    "eos_token_id": 0,
                    "decoder": {"num_hidden_layers": 1, "num_key_value_heads": 1, "head_size": 4},
                }
            }
        )
    )
    from lifecycle_dagster.ml.export import OrtDecoder

    with pytest.raises(ValueError, match="no KV-cache inputs"):
        OrtDecoder(tmp_path, 1)


def test_cache_check_catches_a_cache_that_is_ignored():
    from lifecycle_dagster.ml.export import cache_matches

    rng = np.random.default_rng(0)
    full = rng.normal(size=(6, 50)).astype(np.float32) * 5
    assert cache_matches(full + 1e-4, full)
    # A decoder that ignores its cache sees only the last token: other logits, other argmax.
    assert not cache_matches(rng.normal(size=(6, 50)).astype(np.float32) * 5, full)
