"""What a heavy step costs through Dagster Pipes (a child process) over the run's own process.

    python bench/pipes.py [--steps 300]

Runs one step, pre-training the tiny profile's base model from scratch, inside a Dagster asset:
first in the asset's process (``in_process``; torch and transformers already imported, as in a run
that has trained before), then through ``PipesSubprocessClient`` (``subprocess``, the default),
whose child imports them afresh. Prints both wall times, the difference (the price of a step
outside the run's process) and the ratio, from this one run. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import dagster as dg

from lifecycle_dagster.ml.runtime import RuntimeRequest
from lifecycle_dagster.ml.usecase_loader import load_use_case
from lifecycle_dagster.resources.training import Training


def timed_step(launcher: str, uc, data: Path, out: Path) -> float:
    @dg.asset(name=f"pretrained_{launcher}")
    def pretrained(context):
        Training(launcher=launcher).run(
            context,
            "base_model",
            lambda line: None,
            uc=uc,
            data=data,
            out=out,
            compute=RuntimeRequest(),
            cache_dir=out / "cache",
        )
        return dg.MaterializeResult()

    start = time.perf_counter()
    result = dg.materialize([pretrained])
    seconds = time.perf_counter() - start
    assert result.success, launcher
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="pre-training steps")
    args = parser.parse_args()
    uc = load_use_case(profile="tiny", overrides={"base_model": {"scratch": {"steps": args.steps}}})
    import torch  # noqa: F401  (the run's process has these loaded already)
    import transformers  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        shutil.copy(uc.data.train, data / "train.jsonl")
        times = {
            launcher: timed_step(launcher, uc, data, Path(tmp) / launcher)
            for launcher in ("in_process", "subprocess")
        }
    here, piped = times["in_process"], times["subprocess"]
    print(f"pre-training {args.steps} steps, tiny profile")
    print(f"| launcher | seconds |\n| --- | --- |\n| in_process | {here:.1f} |")
    print(f"| subprocess (Pipes) | {piped:.1f} |")
    print(f"Pipes costs {piped - here:.1f} s a step here: {piped / here:.2f}x the in-process time")


if __name__ == "__main__":
    main()
