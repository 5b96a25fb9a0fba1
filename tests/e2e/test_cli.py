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


FAST_KIND = FAST.replace("rouge_l", "accuracy")


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


def test_a_missed_threshold_exits_non_zero_and_says_why(fresh_home):
    unreachable = FAST.replace("rouge_l: {min: 0.0}", "rouge_l: {min: 0.99}")
    proc = run_cli("--profile", "tiny", "--override", unreachable)
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]  # the last line names the shortfall
    assert last.startswith("check failed: evaluation:meets_thresholds: rouge_l 0.")
    assert "95% CI" in last and "misses >= 0.99" in last
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("onnx_model "))
    assert "not run" in line  # the blocking check kept the candidate from being exported


def test_estimate_prints_the_feasibility_table(capsys):
    assert cli.main(["estimate", "--params", "1e9", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| compute-optimal tokens (20/param) | 2e+10 |" in out
    assert "| training FLOPs (6 x P x T) | 1.2e+20 |" in out
    assert "pre-training time on this machine" in out


def test_init_on_a_teams_csv_then_a_tiny_run(fresh_home, tmp_path):
    """A classification on a CSV with unusual column names and no eval file: drafted by `init`,
    refused with the cause on the last line while a label is wrong, then run as written."""
    import csv
    import json

    from lifecycle_dagster.ml.usecase import USECASES_DIR

    src = USECASES_DIR / "dialogue_intent" / "data"
    rows = [json.loads(ln) for f in ("train.jsonl", "eval.jsonl") for ln in (src / f).open()]
    data = tmp_path / "support tickets.csv"
    with data.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Ticket #", "Customer Message (raw)", "Routing Queue"])
        writer.writerows([f"T{i:04d}", r["dialogue"], r["intent"]] for i, r in enumerate(rows))
    out = tmp_path / "usecase.yaml"
    lifecycle = str(Path(sys.executable).parent / "lifecycle")
    init = subprocess.run(
        [lifecycle, "init", "--data", str(data), "--out", str(out)], capture_output=True, text=True
    )
    assert init.returncode == 0, init.stderr
    text = out.read_text()
    # A wrong label on one row: the run stops before any training, the last line names it.
    good = data.read_text()
    i = next(i for i, r in enumerate(rows) if r["intent"] == "tech support")
    record = good.index(f"\nT{i:04d},") + 1
    line = good[:record].count("\n") + 1
    label_at = good.index(",tech support", record)
    data.write_text(good[:label_at] + ",refund" + good[label_at + len(",tech support") :])
    proc = run_cli("--profile", "tiny", "--config", str(out), "--override", FAST_KIND)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{data}:{line}: field 'target': 'refund' is not one of the labels")
    sft = next(ln for ln in proc.stdout.splitlines() if ln.startswith("sft_adapter "))
    assert "not run" in sft
    data.write_text(good)
    proc = run_cli("--profile", "tiny", "--config", str(out), "--override", FAST_KIND)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: a soft check may fail on tiny
    assert "succeeded" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout
    assert "accuracy_after=" in summary and "onnx_accuracy=" in summary
    assert "rouge" not in summary
    # The summary has a line per stage, the MLflow runs, and the state where it belongs.
    assert {"sft_adapter", "aligned_model", "onnx_model"} <= set(cli.SUMMARY_METRICS)
    for stage in cli.SUMMARY_METRICS:
        line = next(ln for ln in summary.splitlines() if ln.startswith(stage + " "))
        assert " success " in line, line
    assert "MLflow runs:" in summary
    assert (fresh_home / "dagster" / "dagster.yaml").exists()
    assert (fresh_home / "mlflow.db").exists()
    # Progress on long steps reaches the terminal through the run log.
    both = proc.stderr + summary
    assert "pretrain: step" in both and "sft[lora]: step" in both
    assert "labels:" in text and "Routing Queue" in text
