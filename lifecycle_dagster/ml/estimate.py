"""What pre-training (and fine-tuning) a model of a given size would cost, on this machine.

Compute-optimal data follows the Chinchilla rule of thumb (about 20 tokens per parameter); training
compute is about 6 x parameters x tokens FLOPs. Memory counts weights, gradients and Adam state
(activations excluded, they depend on batch and sequence length). Time divides the FLOPs by a matmul
rate measured here, an upper bound on what a real training loop reaches.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from lifecycle_dagster.ml.sft import SFTMethodConfig

TOKENS_PER_PARAM = 20
SECONDS = {"year": 365 * 86400, "day": 86400, "hour": 3600, "minute": 60, "second": 1}


@dataclass(frozen=True)
class Feasibility:
    parameters: float
    tokens: float
    train_flops: float
    full_finetune_bytes: float
    lora_finetune_bytes: float
    lora_trainable_parameters: float
    prompt_tuning_bytes: float
    prompt_tuning_trainable_parameters: float
    device: str
    measured_flops_per_s: float
    pretrain_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        rows = [
            ("parameters", f"{self.parameters:.3g}"),
            ("compute-optimal tokens (20/param)", f"{self.tokens:.3g}"),
            ("training FLOPs (6 x P x T)", f"{self.train_flops:.3g}"),
            (
                "memory, full fine-tuning (weights+grads+Adam)",
                human_bytes(self.full_finetune_bytes),
            ),
            ("memory, LoRA fine-tuning", human_bytes(self.lora_finetune_bytes)),
            (
                f"memory, prompt tuning ({self.prompt_tuning_trainable_parameters:.3g} trained)",
                human_bytes(self.prompt_tuning_bytes),
            ),
            (
                f"matmul rate measured on {self.device}",
                f"{self.measured_flops_per_s / 1e9:.1f} GFLOP/s",
            ),
            ("pre-training time on this machine", human_seconds(self.pretrain_seconds)),
        ]
        return "| quantity | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    for unit, size in SECONDS.items():
        if s >= size or unit == "second":
            return f"{s / size:.3g} {unit}s"
    return f"{s:.3g} seconds"


def measure_matmul_flops(device: str = "cpu", size: int = 1024, seconds: float = 0.5) -> float:
    """Dense fp32 (bf16 on CUDA) matmul FLOP/s on ``device``, timed for about ``seconds``."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * n / (time.perf_counter() - start)


def lora_parameters(
    parameters: float, hidden: int | None = None, layers: int | None = None, r: int = 8
) -> float:
    """LoRA on every linear of every block: about r x (in + out) per matrix, 7 matrices a block."""
    if hidden and layers:
        return layers * 7 * r * (hidden + hidden * 8 / 3)
    return parameters * 0.005  # rule of thumb when the shape is unknown


def estimate(
    parameters: float,
    *,
    device: str = "cpu",
    flops_per_s: float | None = None,
    hidden: int | None = None,
    layers: int | None = None,
    adaptation: SFTMethodConfig | None = None,
    tokens_per_param: float = TOKENS_PER_PARAM,
) -> Feasibility:
    """What pre-training a model of ``parameters`` costs here, and the memory of fine-tuning it
    with ``adaptation``'s LoRA rank and soft-prompt length (the use case's, else the defaults)."""
    adaptation = adaptation or SFTMethodConfig()
    lora_r, virtual_tokens = adaptation.lora_r, adaptation.num_virtual_tokens
    tokens = tokens_per_param * parameters
    flops = 6 * parameters * tokens
    rate = flops_per_s or measure_matmul_flops(device)
    lora = lora_parameters(parameters, hidden, layers, lora_r)
    # A soft prompt: one embedding row per virtual token (width from the shape, else ~sqrt(P/12L)).
    soft = virtual_tokens * (hidden or (parameters / 12 / max(1, layers or 12)) ** 0.5)
    return Feasibility(
        parameters=parameters,
        tokens=tokens,
        train_flops=flops,
        full_finetune_bytes=16 * parameters,  # fp32 weights 4 + grads 4 + Adam m, v 8
        lora_finetune_bytes=4 * parameters + 16 * lora,  # frozen weights + trainable state
        lora_trainable_parameters=lora,
        prompt_tuning_bytes=4 * parameters + 16 * soft,
        prompt_tuning_trainable_parameters=soft,
        device=device,
        measured_flops_per_s=rate,
        pretrain_seconds=flops / rate,
    )
