"""The process a heavy step runs in, launched through Dagster Pipes (a child process, or a pod of
its own on Kubernetes): ``python -m lifecycle_dagster.pipes_step``.

It reads the step's name and JSON arguments from the Pipes context's extras, runs the step
(``lifecycle_dagster.ml.steps``) with its progress lines sent to the run's log, and reports the
result, or the error that stopped it, as one custom message the launching asset reads. The
asset, not this process, records the step in MLflow and returns its metadata, so a step's
records are the same wherever it ran. Needs only the ``dagster-pipes`` package beside the
project's ML dependencies.
"""

from __future__ import annotations

import sys
import traceback

from dagster_pipes import open_dagster_pipes


def main() -> int:
    from lifecycle_dagster.ml import steps

    with open_dagster_pipes() as pipes:
        name = pipes.extras["step"]
        try:
            result = steps.call(name, pipes.extras["args"], log=pipes.log.info)
        except Exception as exc:  # the launching asset raises it with this text
            traceback.print_exc()  # the whole trace in the step's captured stderr
            pipes.report_custom_message({"error": f"{type(exc).__name__}: {exc}"})
            return 0  # the protocol closed cleanly: the error is the step's outcome
        pipes.report_custom_message({"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
