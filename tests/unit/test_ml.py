"""The ml/ layer on a tiny model: training moves the loss, adapters load, exports match PyTorch."""

import numpy as np
import pytest

from lifecycle_dagster.ml.data import (
    EvalSplit,
    format_prompt,
    load_preference_data,
    load_task_data,
    preference_records,
    sft_records,
)
from lifecycle_dagster.ml.evaluate import RewardScorer, evaluate_model, score_split
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


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_sft_loss_falls_and_adapter_loads_and_generates(
    tmp_path, tiny_base, use_case, data, runtime, method
):
    from lifecycle_dagster.ml.sft import SFTMethodConfig, load_sft, train_sft

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
    model, tok = load_sft(tiny_base, tmp_path / "adapter", runtime)
    res = evaluate_model(
        model,
        tok,
        [format_prompt(use_case, r["dialogue"]) for r in data[0]["eval"].rows[:4]],
        [r["summary"] for r in data[0]["eval"].rows[:4]],
        task=use_case.task,
        metric="rouge_l",
        max_new_tokens=8,
        batch_size=4,
    )
    assert len(res.predictions) == 4 and any(res.predictions)
    assert res.perplexity is not None and np.isfinite(res.perplexity)


def test_full_finetune_beats_base_rouge(tmp_path, tiny_base, use_case, data, runtime):
    from lifecycle_dagster.ml.sft import SFTMethodConfig, load_sft, train_sft

    split = EvalSplit(use_case, data[0]["eval"].rows[:16])
    before = score_split(
        load_causal_lm(tiny_base, runtime),
        load_tokenizer(tiny_base),
        split,
        max_new_tokens=24,
        batch_size=16,
    )
    train_sft(
        tiny_base,
        sft_records(use_case, data[0]["train"].rows),
        tmp_path / "full",
        SFTMethodConfig(method="full", max_steps=100, learning_rate=1e-3),
        runtime,
    )
    assert not (tmp_path / "full" / "adapter_config.json").exists()
    after = score_split(
        *load_sft(tiny_base, tmp_path / "full", runtime), split, max_new_tokens=24, batch_size=16
    )
    assert after.metric == "rouge_l"
    assert after.primary > before.primary + 0.05


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


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_an_interrupted_alignment_resumes_from_its_checkpoint(
    tmp_path, tiny_base, tiny_reward, use_case, data, runtime, method, monkeypatch
):
    """Alignment stops after its first checkpoint (the process dies; here, an error); the next
    attempt with the same checkpoints resumes at that step and trains the rest."""
    from lifecycle_dagster.ml import progress
    from lifecycle_dagster.ml.align import AlignMethodConfig, align

    rows = data[0]["train"].rows[:32]
    config = AlignMethodConfig(method=method, max_steps=3, batch_size=8, learning_rate=1e-3)
    checkpoints = progress.Checkpoints(tmp_path / "ckpt", every=1)

    def attempt():
        policy = load_causal_lm(tiny_base, runtime)
        policy.train()
        return align(
            policy,
            load_tokenizer(tiny_base),
            tmp_path / "aligned",
            config,
            runtime,
            prompts=[format_prompt(use_case, r["dialogue"]) for r in rows],
            pairs=preference_records(use_case, data[1]["train"].rows[:32]),
            scorer=RewardScorer(tiny_reward[0], runtime),
            checkpoints=checkpoints,
        )

    update = progress.Progress.update

    def dies_at_step_2(self, step, **metrics):
        if step >= 2:
            raise RuntimeError("killed")
        update(self, step, **metrics)

    monkeypatch.setattr(progress.Progress, "update", dies_at_step_2)
    with pytest.raises(RuntimeError, match="killed"):
        attempt()
    assert (tmp_path / "ckpt" / "checkpoint-1").is_dir() and not (tmp_path / "aligned").exists()
    monkeypatch.setattr(progress.Progress, "update", update)
    result = attempt()
    assert result.resumed_from == 1
    assert [s for s, _ in result.loss_curve] == [1, 2, 3]
    assert not (tmp_path / "ckpt").exists()


def test_policy_and_quality_budget():
    from lifecycle_dagster.ml.compress import CompressConfig, VariantReport, quality_drop
    from lifecycle_dagster.ml.compress import select_variant as pick
    from lifecycle_dagster.ml.faithfulness import Faithfulness

    budget = CompressConfig(max_metric_drop=0.01, max_reward_drop_pct=2.0)
    ref = {"rouge_l": 0.70, "mean_reward": 2.0}
    assert quality_drop(ref, "rouge_l", 0.695, 1.97, budget)[2]  # 0.5 pt, 1.5 %
    assert not quality_drop(ref, "rouge_l", 0.685, 1.99, budget)[2]  # 1.5 pts
    assert not quality_drop(ref, "rouge_l", 0.70, 1.9, budget)[2]  # 5 % of reward
    # A negative mean reward: the loss is a fraction of its magnitude.
    neg = {"rouge_l": 0.7, "mean_reward": -1.0}
    assert not quality_drop(neg, "rouge_l", 0.7, -1.05, budget)[2]
    # The budget's older name still reads.
    assert CompressConfig(max_rouge_l_drop=0.02).max_metric_drop == 0.02

    def report(name, size, tps, ok, cache=True):
        faith = Faithfulness(name, 0.0, 1.0, 1.0, cache, tps, 10.0)
        return VariantReport(name, size, faith, "rouge_l", 0.7, None, tps, 0.0, None, ok)

    reports = [
        report("fp32", 500, 30, True),
        report("int8", 250, 90, True),
        report("int4", 120, 80, True),
        report("int4_bad", 90, 120, False),
    ]
    assert pick(reports, "smallest") == "int4"
    assert pick(reports, "fastest") == "int8"
    # speed-up x size reduction against fp32: int8 3.0 x 2.0 = 6.0, int4 2.67 x 4.17 = 11.1
    assert pick(reports, "best_within_budget") == "int4"
    slow_int4 = report("int4", 120, 40, True)  # 1.33 x 4.17 = 5.6 < 6.0
    assert pick([*reports[:2], slow_int4], "best_within_budget") == "int8"
    assert pick([report("int4", 120, 80, True, cache=False), reports[0]], "smallest") == "fp32"
    assert pick([reports[3]], "smallest") is None


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
    from lifecycle_dagster.ml.runtimes import OrtDecoder

    with pytest.raises(ValueError, match="no KV-cache inputs"):
        OrtDecoder(tmp_path, 1)


def test_cache_check_catches_a_cache_that_is_ignored():
    from lifecycle_dagster.ml.faithfulness import cache_matches

    rng = np.random.default_rng(0)
    full = rng.normal(size=(6, 50)).astype(np.float32) * 5
    assert cache_matches(full + 1e-4, full)
    # A decoder that ignores its cache sees only the last token: other logits, other argmax.
    assert not cache_matches(rng.normal(size=(6, 50)).astype(np.float32) * 5, full)
    # A near-tie (within tolerance) may be broken either way by a one-row kernel.
    tie = full.copy()
    tie[0, 1] = tie[0].max() + 1e-3
    stepped = tie.copy()
    stepped[0, 1] -= 2e-3  # now the previous best wins this step
    assert stepped[0].argmax() != tie[0].argmax() and cache_matches(stepped, tie)
