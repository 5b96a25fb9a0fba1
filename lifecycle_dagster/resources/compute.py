"""Compute settings as a resource: device and thread counts, resolved at run time on the host."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from lifecycle_dagster.ml.runtime import Runtime, RuntimeRequest


class Compute(dg.ConfigurableResource):
    device: str = Field(
        default="auto", description="auto (CUDA, then MPS, then CPU), cpu, cuda, mps."
    )
    torch_threads: int = Field(default=0, description="torch intra-op threads; 0 = all cores.")
    ort_threads: int = Field(default=0, description="onnxruntime intra-op threads; 0 = all cores.")

    def request(self, spec=None) -> RuntimeRequest:
        """The resource's settings win where set; else the use case's ``compute`` section."""
        device = self.device if self.device != "auto" or spec is None else spec.device
        return RuntimeRequest(
            device,
            self.torch_threads or (spec.torch_threads if spec else None),
            self.ort_threads or (spec.ort_threads if spec else None),
            spec.activation_checkpointing if spec else "auto",
        )

    def runtime(self, spec=None) -> Runtime:
        """The request resolved on this host."""
        return self.request(spec).resolve()
