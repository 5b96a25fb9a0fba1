"""A heavy step's arguments and result cross a process boundary as JSON, driven by the step's
type hints: what goes out comes back as the same objects."""

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from lifecycle_dagster.ml import steps
from lifecycle_dagster.ml.compress import CompressionResult, VariantReport
from lifecycle_dagster.ml.faithfulness import Faithfulness
from lifecycle_dagster.ml.progress import Checkpoints
from lifecycle_dagster.ml.runtime import RuntimeRequest
from lifecycle_dagster.ml.sft import SFTMethodConfig, SFTResult


def dataclasses_in(hint, seen: set) -> None:
    for arg in typing.get_args(hint):
        dataclasses_in(arg, seen)
    if dataclasses.is_dataclass(hint) and hint not in seen:
        seen.add(hint)
        for field_hint in typing.get_type_hints(hint).values():
            dataclasses_in(field_hint, seen)


def test_every_step_type_resolves():
    """Every type a step takes or returns, nested ones included, is known at run time (a name
    imported only for type checkers would fail in the step's process)."""
    seen: set = set()
    for fn in steps.STEPS.values():
        for hint in typing.get_type_hints(fn).values():
            dataclasses_in(hint, seen)
    assert {SFTResult, CompressionResult, VariantReport, Faithfulness, Checkpoints} <= seen


def test_arguments_travel_as_json_and_come_back_typed(tmp_path):
    args = steps.encode_args(
        "sft_adapter",
        uc=None,
        base=tmp_path / "base",
        data=tmp_path / "data",
        out=tmp_path / "out",
        method=SFTMethodConfig(method="lora", max_steps=7),
        compute=RuntimeRequest("auto", 2, None),
        checkpoints=Checkpoints(tmp_path / "ckpt", 5),
    )
    args = json.loads(json.dumps(args))  # what the step's process receives
    hints = typing.get_type_hints(steps.sft_adapter)
    assert steps.decode(args["base"], hints["base"]) == tmp_path / "base"
    assert steps.decode(args["method"], hints["method"]).max_steps == 7
    assert steps.decode(args["compute"], hints["compute"]) == RuntimeRequest("auto", 2, None)
    assert steps.decode(args["checkpoints"], hints["checkpoints"]) == Checkpoints(
        tmp_path / "ckpt", 5
    )


def test_a_nested_result_comes_back_equal():
    variant = VariantReport(
        name="int8",
        bytes=123,
        faithfulness=Faithfulness("int8", 0.03, 1.0, 1.0, True, 50.0, 20.0, [{"prompt": "p"}]),
        metric="rougeL",
        quality=0.5,
        mean_reward=None,
        tokens_per_s=10.0,
        quality_drop=0.01,
        reward_drop_pct=None,
        within_budget=True,
        predictions=["a", "b"],
        drop_ci=(-0.1, 0.2),
    )
    result = CompressionResult(
        path=Path("/x/onnx"),
        variants={"int8": variant},
        selected="int8",
        policy="smallest",
        metric="rougeL",
        reference={"rougeL": 0.5, "mean_reward": None},
        fp32_matches=True,
        cache_in_use=True,
        export_seconds={"int8": 1.5},
    )
    sent = json.loads(json.dumps(steps.encode(result)))
    assert steps.decode(sent, CompressionResult) == result


def test_a_step_called_with_the_wrong_arguments_fails_before_it_starts(tmp_path):
    with pytest.raises(TypeError, match=r"step onnx_model: arguments .*expected"):
        steps.encode_args("onnx_model", uc=None, source=tmp_path)
