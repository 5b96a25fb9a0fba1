"""Where the heavy steps run: in a child process through Dagster Pipes (the default), in a
Kubernetes pod of their own through Pipes (one pod per step, carrying the GPU request), or in the
run's own process.

Every launcher hands the asset the same result (``lifecycle_dagster.ml.steps``), and the asset
records it, so metadata, checks and MLflow records do not depend on where a step ran. Progress
lines reach the run's log as the step prints them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError  # not re-exported by dagster
from pydantic import Field

from lifecycle_dagster.ml import steps
from lifecycle_dagster.ml.progress import Log

LAUNCHERS = ("subprocess", "k8s", "in_process")
ENTRY_POINT = ["-m", "lifecycle_dagster.pipes_step"]
# A step whose process or pod was lost (SIGKILL, the OOM killer, a preempted node) is run again
# once in the same run, which resumes training from the lost attempt's last checkpoint (they are
# keyed by the run). A step that reported an error is not: it would fail the same way.
LOST_RETRIES = 1


class StepFailed(RuntimeError):
    """A step that ran elsewhere failed; the message is its own error."""


class Training(dg.ConfigurableResource):
    launcher: str = Field(
        default="subprocess",
        description="subprocess (a child process through Dagster Pipes), k8s (a pod per step "
        "through Pipes, with the GPU request of lib/k8s.py) or in_process (the run's process).",
    )
    image: str = Field(
        default="",
        description="k8s: the step pods' image; default the run's own (DAGSTER_CURRENT_IMAGE).",
    )
    namespace: str = Field(
        default="", description="k8s: the step pods' namespace; default the run's."
    )

    def run(self, context: dg.AssetExecutionContext, step: str, log: Log, **kwargs) -> Any:
        """Run ``step`` with ``kwargs`` (checked against its signature before anything starts)
        and return its result."""
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"training launcher {self.launcher!r}: expected one of {LAUNCHERS}")
        args = steps.encode_args(step, **kwargs)
        if self.launcher == "in_process":
            return steps.result_of(step, steps.call(step, args, log))
        extras = {"step": step, "args": args}
        try:
            if self.launcher == "k8s":
                invocation = self._k8s(context, extras)
            else:
                invocation = dg.PipesSubprocessClient().run(
                    context=context, extras=extras, command=[sys.executable, *ENTRY_POINT]
                )
        except (DagsterPipesExecutionError, *_k8s_errors()) as exc:  # lost before it reported
            lost = f"step {step} ({self.launcher}) ended without a result: {exc}"
            if context.retry_number < LOST_RETRIES:
                context.log.warning(f"{lost}; running it again, from its last checkpoint")
                raise dg.RetryRequested(max_retries=LOST_RETRIES, seconds_to_wait=1) from exc
            raise StepFailed(lost) from exc
        (message, *_) = [m for m in invocation.get_custom_messages() if m] or [{}]
        if "error" in message:
            raise StepFailed(f"step {step}: {message['error']}")
        if "result" not in message:
            raise StepFailed(f"step {step} ({self.launcher}) reported no result")
        return steps.result_of(step, message["result"])

    def _k8s(self, context, extras: dict):
        from dagster_k8s import PipesK8sClient

        from lifecycle_dagster.lib.k8s import step_pod

        image = self.image or os.environ.get("DAGSTER_CURRENT_IMAGE", "")
        if not image:
            raise ValueError("training launcher k8s: no image (set it, or DAGSTER_CURRENT_IMAGE)")
        meta, spec = step_pod(image)
        return PipesK8sClient().run(
            context=context,
            extras=extras,
            command=["python", *ENTRY_POINT],
            namespace=self.namespace or None,
            base_pod_meta=meta,
            base_pod_spec=spec,
        )


def _k8s_errors() -> tuple[type[Exception], ...]:
    """How a training pod that failed without reporting shows (dagster-k8s, when installed)."""
    try:
        from dagster_k8s.client import DagsterK8sError
    except ImportError:
        return ()
    return (DagsterK8sError,)
