"""Progress of long steps (step/total, elapsed, ETA) and the loss history they produce."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lifecycle_dagster.ml.distributed import ddp_kwargs, is_main_process, per_process_batch

Log = Callable[[str], None]
# What a progress line shows when a trainer logs them (trl's GRPO logs about 25 values a step; the
# whole record stays in the trainer's log_history and in MLflow's curves).
SHOWN = ("loss", "reward", "kl", "rewards/chosen", "rewards/accuracies", "accuracy", "train_loss")


@dataclass
class Progress:
    """Reports ``stage: step/total, loss, elapsed, ETA`` at most every ``every`` seconds."""

    stage: str
    total: int
    log: Log | None = None
    every: float = 5.0
    history: list[dict] = field(default_factory=list)
    _start: float = field(default_factory=time.monotonic)
    _last: float = 0.0

    def update(self, step: int, **metrics: float) -> None:
        if metrics:
            self.history.append({"step": step, **{k: float(v) for k, v in metrics.items()}})
        now = time.monotonic()
        if self.log is None or (now - self._last < self.every and step < self.total):
            return
        self._last = now
        elapsed = now - self._start
        eta = elapsed / step * (self.total - step) if step else float("nan")
        picked = {k: v for k, v in metrics.items() if k in SHOWN} or dict(list(metrics.items())[:4])
        shown = ", ".join(f"{k} {v:.4g}" for k, v in picked.items())
        self.log(
            f"{self.stage}: step {step}/{self.total}"
            f"{', ' + shown if shown else ''}, elapsed {elapsed:.0f}s, ETA {eta:.0f}s"
        )

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(h["step"], h[key]) for h in self.history if key in h]

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start


def hf_callback(progress: Progress):
    """A transformers TrainerCallback feeding a Progress from the trainer's logs."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = {
                k: v
                for k, v in (logs or {}).items()
                if isinstance(v, (int, float)) and k not in ("epoch", "step")
            }
            if logs:
                progress.update(state.global_step, **logs)

    return _Callback()


class History:
    """A trainer's own record of what it logged (``trainer.state.log_history``), as curves."""

    def __init__(self, records: list[dict]):
        self.records = records

    def series(self, key: str) -> list[tuple[int, float]]:
        return [
            (int(r["step"]), float(r[key]))
            for r in self.records
            if isinstance(r.get(key), int | float) and "step" in r
        ]


def loss_ends(history: Progress | History, key: str = "loss") -> tuple[float, float]:
    """Mean of the first and of the last tenth of a logged curve: start and end, less noisy."""
    values = [v for _, v in history.series(key)] or [float("nan")]
    k = max(1, len(values) // 10)
    return sum(values[:k]) / k, sum(values[-k:]) / k


@dataclass(frozen=True)
class Checkpoints:
    """Resumable trainer checkpoints of one training step, every ``every`` steps (0: none).

    They live in ``dir``, outside the artifact being written (which stays all-or-nothing), keyed
    by the run and the step's settings: a re-execution of the same run finds them and resumes
    where the killed process stopped. Removed once training finished."""

    dir: Path
    every: int

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"checkpoint interval must be >= 0 steps, got {self.every}")


@contextlib.contextmanager
def training_dir(
    checkpoints: Checkpoints | None, prefix: str, stage: str, log: Log | None = None
) -> Iterator[tuple[str, str | None, dict]]:
    """The trainer's output directory, the checkpoint to resume from (or None) and the
    TrainingArguments that save checkpoints there. Without checkpoints: a scratch directory.

    The directory holds ``owner.json`` (process, host, start) while a trainer writes to it."""
    if checkpoints is None or not checkpoints.every:
        with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
            yield scratch, None, {}
        return
    main = is_main_process()  # of several training processes, rank 0 keeps the folder
    ckpt = checkpoints.dir
    ckpt.mkdir(parents=True, exist_ok=True)
    resume = last_complete_checkpoint(ckpt, drop_incomplete=main)
    if resume and log:
        log(f"{stage}: resuming from {Path(resume).name} (kept by the interrupted attempt)")
    if main:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        (ckpt / "owner.json").write_text(json.dumps(owner))
    save = {"save_strategy": "steps", "save_steps": checkpoints.every, "save_total_limit": 1}
    yield str(ckpt), resume, save
    if main:
        shutil.rmtree(ckpt, ignore_errors=True)  # trained: the artifact is what stays


def last_complete_checkpoint(folder: Path, drop_incomplete: bool = False) -> str | None:
    """The newest ``checkpoint-N`` the Trainer finished writing (its ``trainer_state.json`` is
    written last), or None. A process killed while saving leaves a partial one: it is never
    resumed from, and with ``drop_incomplete`` it is removed."""
    steps = []
    for path in folder.glob("checkpoint-*"):
        suffix = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and suffix.isdigit():
            steps.append((int(suffix), path))
    for _, path in sorted(steps, reverse=True):
        if (path / "trainer_state.json").is_file():
            return str(path)
        if drop_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None


def resumed_step(resume: str | None) -> int:
    """The step a trainer resumed from (0: it started afresh)."""
    return int(Path(resume).name.rsplit("-", 1)[-1]) if resume else 0


def trainer_kwargs(
    *,
    output_dir: str,
    max_steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    runtime,
    scheduler: str = "cosine",
    save: dict | None = None,
) -> dict:
    """The TrainingArguments every stage shares: no reporters, our own progress, checkpoints only
    as ``save`` (from ``training_dir``) asks."""
    return {
        "output_dir": output_dir,
        "max_steps": max_steps,
        "learning_rate": learning_rate,
        "per_device_train_batch_size": per_process_batch(batch_size),
        "lr_scheduler_type": scheduler,
        "warmup_steps": max(1, max_steps // 20) if scheduler == "cosine" else 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": seed,
        "bf16": runtime.bf16,
        # trl turns it on by default; the runtime decides (compute.activation_checkpointing).
        "activation_checkpointing": runtime.activation_checkpointing,
        "use_cpu": runtime.device == "cpu",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        **ddp_kwargs(runtime),
        **(save or {}),
    }
