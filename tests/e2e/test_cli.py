"""The `lifecycle` console script: fast failure on bad input, and a full run with its summary."""

import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle_dagster import cli

FAST = (
    "{base_model: {scratch: {steps: 60}}, adaptation: {max_steps: 20}, "
    "reward: {max_steps: 20}, alignment: {max_steps: 2}, "
    "evaluation: {max_examples: 8, thresholds: {rouge_l: {min: 0.0}}}, prompting: {shots: [0, 1]}, "
    "compression: {check_prompts: 2, variants: [fp32, int8]}}"
)


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFECYCLE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "state" / "dagster"))
    return tmp_path / "state"


def test_profiles_lists_tiny(capsys):
    assert cli.main(["profiles"]) == 0
    assert "tiny" in capsys.readouterr().out


def test_bad_use_case_fails_fast_naming_file_line_field(fresh_home, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("adaptation:\n  method: lora\n  lora_r: -4\n")
    assert cli.main(["run", "--profile", "tiny", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3" in err and "adaptation.lora_r" in err
    assert not (fresh_home / "artifacts").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "lifecycle"), "run", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_run_materializes_everything_and_prints_the_summary(fresh_home):
    proc = run_cli("--profile", "tiny", "--override", FAST)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "succeeded" in out
    for stage in (
        "use_case",
        "base_model",
        "prompt_baseline",
        "sft_adapter",
        "reward_model",
        "aligned_model",
        "evaluation",
        "onnx_model",
        "lifecycle_report",
    ):
        line = next(ln for ln in out.splitlines() if ln.startswith(stage + " "))
        assert " success " in line, line
    assert "MLflow runs:" in out
    assert (fresh_home / "dagster" / "dagster.yaml").exists()
    assert (fresh_home / "mlflow.db").exists()
    # Progress on long steps reaches the terminal through the run log.
    assert "pretrain: step" in proc.stderr + out and "sft[lora]: step" in proc.stderr + out


def test_a_missed_threshold_exits_non_zero_and_says_why(fresh_home):
    unreachable = FAST.replace("rouge_l: {min: 0.0}", "rouge_l: {min: 0.99}")
    proc = run_cli("--profile", "tiny", "--override", unreachable)
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout
    assert "check failed: evaluation:meets_thresholds" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("onnx_model "))
    assert "not run" in line  # the blocking check kept the candidate from being exported


def test_estimate_prints_the_feasibility_table(capsys):
    assert cli.main(["estimate", "--params", "1e9", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| compute-optimal tokens (20/param) | 2e+10 |" in out
    assert "| training FLOPs (6 x P x T) | 1.2e+20 |" in out
    assert "pre-training time on this machine" in out
