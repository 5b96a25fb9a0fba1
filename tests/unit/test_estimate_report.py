"""Feasibility estimates and the lifecycle report, from plain inputs."""

import pytest

from lifecycle_dagster.ml.estimate import estimate, human_seconds
from lifecycle_dagster.ml.report import PHASES, build_report
from lifecycle_dagster.ml.sft import SFTMethodConfig


def test_estimate_follows_the_rules_of_thumb():
    e = estimate(1e9, flops_per_s=1e12)
    assert e.tokens == pytest.approx(2e10)
    assert e.train_flops == pytest.approx(6 * 1e9 * 2e10)
    assert e.pretrain_seconds == pytest.approx(1.2e8)
    assert e.full_finetune_bytes == pytest.approx(16e9)
    assert e.lora_finetune_bytes < e.full_finetune_bytes / 3
    # A soft prompt of 16 rows: about 16 x hidden trained (hidden ~ sqrt(P / 12 L)), frozen weights.
    assert e.prompt_tuning_trainable_parameters == pytest.approx(16 * (1e9 / 144) ** 0.5)
    assert 4e9 < e.prompt_tuning_bytes < e.lora_finetune_bytes
    shaped = estimate(
        1e9,
        flops_per_s=1e12,
        hidden=2048,
        layers=24,
        adaptation=SFTMethodConfig(num_virtual_tokens=20),
    )
    assert shaped.prompt_tuning_trainable_parameters == 20 * 2048
    assert human_seconds(e.pretrain_seconds).endswith("years")


def test_estimate_measures_a_real_matmul_rate():
    assert estimate(1e6, device="cpu").measured_flops_per_s > 1e8


def test_report_rows_follow_the_phases_and_sum_durations():
    meta = {
        "base_model": {"duration_s": 20.0, "source": "scratch", "parameters": 1e5},
        "prompt_baseline": {"duration_s": 2.0},
        "sft_adapter": {
            "duration_s": 9.0,
            "method": "lora",
            "trainable_fraction": 0.1,
            "max_steps": 150,
            "device": "cpu",
        },
        "reward_model": {"duration_s": 12.0},
        "aligned_model": {"duration_s": 7.0, "method": "grpo", "max_steps": 30},
        "evaluation": {"duration_s": 2.0},
        "onnx_model": {
            "duration_s": 7.0,
            "selected_variant": "int8",
            "size_ratio": 1.4,
            "speedup": 6.0,
        },
    }
    markdown, rows = build_report(meta)
    assert [r["phase"] for r in rows] == [p.name for p in PHASES]
    alignment = next(r for r in rows if r["phase"].startswith("alignment"))
    assert alignment["seconds"] == 19.0
    assert "adapter weights (LoRA), 10.00% of parameters" in markdown
    assert "all weights (trained from scratch)" in markdown
    assert "days to months" in markdown and "6.0x faster" in markdown
