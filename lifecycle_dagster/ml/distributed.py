"""Training in several processes: one per GPU, or CPU processes talking over gloo.

``launch_sft`` runs ``torch.distributed.run`` (torchrun) with N copies of this module's entry
point; the Trainer in each copy takes its shard of every batch and gradients are averaged, so N
processes train the model one process would, on the same global batch (each process gets
``batch_size / N`` examples a step). Rank 0 alone writes the artifact and the result.

The world a process is in comes from torchrun's environment (``RANK``, ``WORLD_SIZE``); a process
started any other way is a world of one and nothing here changes how it trains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lifecycle_dagster.ml.progress import Checkpoints, Log
    from lifecycle_dagster.ml.runtime import Runtime


def world() -> tuple[int, int]:
    """This process's rank and the number of processes training together."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return world()[0] == 0


def per_process_batch(batch_size: int) -> int:
    """Each process's share of the global batch."""
    size = world()[1]
    if batch_size % size:
        raise ValueError(f"batch_size {batch_size} does not split over {size} training processes")
    return batch_size // size


def ddp_kwargs(runtime: Runtime) -> dict:
    """TrainingArguments of one process of several: gloo between CPU processes, NCCL on GPUs."""
    if world()[1] == 1:
        return {}
    return {"ddp_backend": "nccl" if runtime.device == "cuda" else "gloo"}


def fine_tune(
    base_model: Path,
    records: list[dict],
    out_dir: Path,
    config,
    runtime: Runtime,
    processes: int = 1,
    log: Log | None = None,
    **kwargs,
):
    """``train_sft`` in this process, or in ``processes`` processes (``compute.processes``)."""
    from lifecycle_dagster.ml.sft import train_sft

    if processes == 1:
        return train_sft(base_model, records, out_dir, config, runtime, log, **kwargs)
    return launch_sft(base_model, records, out_dir, config, runtime, processes, log, **kwargs)


def launch_sft(
    base_model: Path,
    records: list[dict],
    out_dir: Path,
    config,
    runtime: Runtime,
    processes: int,
    log: Log | None = None,
    *,
    init_text: str = "",
    checkpoints: Checkpoints | None = None,
    timeout_s: float = 24 * 3600,
):
    """Fine-tune as ``train_sft`` does, in ``processes`` processes launched by torchrun; returns
    rank 0's ``SFTResult``. Threads: the runtime's torch threads shared between the processes.
    Rank 0's progress lines reach ``log`` as they come."""
    from lifecycle_dagster.ml.sft import SFTResult

    with tempfile.TemporaryDirectory(prefix="ddp-") as tmp:
        work = Path(tmp)
        (work / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        spec = {
            "base_model": str(base_model),
            "out_dir": str(out_dir),
            "config": config.model_dump(mode="json"),
            "device": runtime.device,
            "torch_threads": max(1, runtime.torch_threads // processes),
            "init_text": init_text,
            "checkpoints": [str(checkpoints.dir), checkpoints.every] if checkpoints else None,
        }
        (work / "spec.json").write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={processes}", "-m", __name__, str(work)]
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["torch_threads"])}
        if log:
            log(f"sft: {processes} processes ({'NCCL' if runtime.device == 'cuda' else 'gloo'})")
        returncode, tail = _run_streaming(cmd, env, log, timeout_s)
        if returncode:
            raise RuntimeError(
                f"distributed training failed (exit {returncode}):\n" + "\n".join(tail)
            )
        result = json.loads((work / "result.json").read_text())
    if result.pop("world_size") != processes:
        raise RuntimeError(f"distributed training ran in fewer than {processes} processes")
    result["loss_curve"] = [tuple(p) for p in result["loss_curve"]]
    return SFTResult(path=Path(out_dir), **result)


PROGRESS_MARK = "@@progress "


def _run_streaming(cmd: list[str], env: dict, log: Log | None, timeout_s: float):
    """Run ``cmd``; lines rank 0 marks as progress go to ``log`` as they come. Killed after
    ``timeout_s`` even if it prints nothing. Returns the exit code and the last 20 lines."""
    import collections
    import threading

    tail: collections.deque[str] = collections.deque(maxlen=20)
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        watchdog = threading.Timer(timeout_s, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith(PROGRESS_MARK):
                    if log:
                        log(line.removeprefix(PROGRESS_MARK))
                else:
                    tail.append(line)
            returncode = proc.wait()
        finally:
            watchdog.cancel()
        if returncode < 0 and not watchdog.is_alive():
            tail.append(f"stopped after {timeout_s:.0f} s or killed")
        return returncode, list(tail)


def main(work: Path) -> None:
    """One process of a ``launch_sft``: train, and on rank 0 write the result."""
    from dataclasses import asdict

    import torch.distributed

    from lifecycle_dagster.ml.progress import Checkpoints
    from lifecycle_dagster.ml.runtime import select_runtime
    from lifecycle_dagster.ml.sft import SFTMethodConfig, train_sft

    spec = json.loads((work / "spec.json").read_text())
    records = [json.loads(line) for line in (work / "records.jsonl").open()]
    runtime = select_runtime(spec["device"], torch_threads=spec["torch_threads"])
    config = SFTMethodConfig.model_validate(spec["config"])
    checkpoints = (
        Checkpoints(Path(spec["checkpoints"][0]), spec["checkpoints"][1])
        if spec["checkpoints"]
        else None
    )

    def log(message: str) -> None:
        if is_main_process():
            print(PROGRESS_MARK + message, flush=True)

    result = train_sft(
        Path(spec["base_model"]),
        records,
        Path(spec["out_dir"]),
        config,
        runtime,
        log,
        init_text=spec["init_text"],
        checkpoints=checkpoints,
    )
    if is_main_process():
        out = {k: v for k, v in asdict(result).items() if k != "path"}
        out["world_size"] = torch.distributed.get_world_size()  # as the process group saw it
        (work / "result.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
