"""Where and how compute runs: device, dtype and thread counts, picked at run time."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Runtime:
    device: str
    dtype: str  # "float32" or "bfloat16"
    torch_threads: int
    ort_threads: int
    # Recompute activations in the backward pass instead of keeping them: less memory, more
    # compute (``select_runtime`` resolves "auto").
    activation_checkpointing: bool = False

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    def describe(self) -> str:
        return f"{self.device} ({self.dtype}, torch threads {self.torch_threads})"


@dataclass(frozen=True)
class RuntimeRequest:
    """The compute a step asks for, resolved (``select_runtime``) on the host the step runs on:
    a training pod sees its GPU where the run that launched it may not."""

    device: str = "auto"
    torch_threads: int | None = None
    ort_threads: int | None = None
    activation_checkpointing: str = "auto"

    def resolve(self) -> Runtime:
        return select_runtime(
            self.device, self.torch_threads, self.ort_threads, self.activation_checkpointing
        )


def available_cores() -> int:
    """The cores this process may use: ``OMP_NUM_THREADS`` when set (a container's CPU limit, a
    share of a host), else the CPUs it is pinned to, else every CPU."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def select_runtime(
    device: str = "auto",
    torch_threads: int | None = None,
    ort_threads: int | None = None,
    activation_checkpointing: str = "auto",
) -> Runtime:
    """CUDA when present (bf16 where supported), Apple MPS next, else CPU; threads set explicitly.

    On small hosts torch and onnxruntime threads fight each other, so both counts are set here and
    applied once (torch.set_num_threads) rather than left to each library's default.
    Activation checkpointing "auto" is on for an accelerator (its memory is what runs out) and
    off on CPU (its compute is: checkpointing made the demo's LoRA steps take 1.5x as long).
    """
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("compute.device is 'cuda' but no CUDA device is available")
    dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    cores = available_cores()
    torch_threads = torch_threads or cores
    ort_threads = ort_threads or cores
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    if activation_checkpointing not in ("auto", "on", "off"):
        raise ValueError(
            f"compute.activation_checkpointing is {activation_checkpointing!r}: auto, on or off"
        )
    checkpointing = (
        device != "cpu" if activation_checkpointing == "auto" else activation_checkpointing == "on"
    )
    return Runtime(
        device=device,
        dtype=dtype,
        torch_threads=torch_threads,
        ort_threads=ort_threads,
        activation_checkpointing=checkpointing,
    )
