"""Training resumes where a killed process stopped: the trainer checkpoints of a step outlive it,
a second attempt with the same settings resumes from the last complete one, and the result is
the same training as one that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

from lifecycle_dagster.ml.data import load_task_data, sft_records
from lifecycle_dagster.ml.progress import Checkpoints
from lifecycle_dagster.ml.sft import SFTMethodConfig, load_sft, train_sft

STEPS, EVERY = 30, 5
CONFIG = SFTMethodConfig(method="lora", max_steps=STEPS, learning_rate=3e-3)

# The first attempt, in its own process, slowed down (0.1 s a step) so that it is killed halfway.
CHILD = """
import sys, time
from pathlib import Path
from lifecycle_dagster.ml import progress
from lifecycle_dagster.ml.data import load_task_data, sft_records
from lifecycle_dagster.ml.runtime import select_runtime
from lifecycle_dagster.ml.sft import SFTMethodConfig, train_sft
from lifecycle_dagster.ml.usecase_loader import load_use_case

update = progress.Progress.update
def slow(self, step, **metrics):
    time.sleep(0.1)
    update(self, step, **metrics)
progress.Progress.update = slow
uc = load_use_case(profile="tiny")
records = sft_records(uc, load_task_data(uc)["train"].rows)
config = SFTMethodConfig.model_validate_json(sys.argv[3])
ckpt = progress.Checkpoints(Path(sys.argv[2]), int(sys.argv[4]))
train_sft(Path(sys.argv[1]), records, Path(sys.argv[2]) / "never", config,
          select_runtime("cpu", torch_threads=1), checkpoints=ckpt)
"""


def test_a_killed_training_resumes_from_its_last_checkpoint(tmp_path, tiny_base, use_case, runtime):
    ckpt, log = tmp_path / "ckpt", tmp_path / "first-attempt.log"
    with log.open("w") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tiny_base), str(ckpt), CONFIG.model_dump_json()]
            + [str(EVERY)],
            env={**os.environ, "LIFECYCLE_HOME": str(tmp_path / "home")},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 180
    try:
        while not (ckpt / "checkpoint-10").is_dir():
            assert child.poll() is None, f"the first attempt ended early:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no checkpoint-10 within 180 s"
            time.sleep(0.05)
        owner = json.loads((ckpt / "owner.json").read_text())
        assert owner["pid"] == child.pid
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (ckpt / "never").exists()  # nothing of the artifact was written
    # The kill may have caught a checkpoint half-written: the newest complete one is resumed.
    saved = [int(p.parent.name.split("-")[1]) for p in ckpt.glob("checkpoint-*/trainer_state.json")]
    assert saved, "no complete checkpoint"
    killed_at = max(saved)
    assert 5 <= killed_at < STEPS

    records = sft_records(use_case, load_task_data(use_case)["train"].rows)
    resumed = train_sft(
        tiny_base,
        records,
        tmp_path / "resumed",
        CONFIG,
        runtime,
        checkpoints=Checkpoints(ckpt, EVERY),
    )
    assert resumed.resumed_from == killed_at
    assert not ckpt.exists()  # trained: the checkpoints are gone, the artifact stays
    steps = [s for s, _ in resumed.loss_curve]
    assert steps == list(range(1, STEPS + 1))  # the killed attempt's curve, then the rest

    whole = train_sft(tiny_base, records, tmp_path / "whole", CONFIG, runtime)
    gap = max(
        abs(a - b) for (_, a), (_, b) in zip(resumed.loss_curve, whole.loss_curve, strict=True)
    )
    print(f"\nresumed at step {killed_at}: largest loss difference {gap:.2e}")
    assert gap < 1e-3, "the resumed training is not the interrupted one continued"
    model, tok = load_sft(tiny_base, tmp_path / "resumed", runtime)
    out = model.generate(**tok("#Person1#: hi", return_tensors="pt"), max_new_tokens=4)
    assert out.shape[1] > 0
