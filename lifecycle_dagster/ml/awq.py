"""Activation-aware scaling before 4-bit export: the input channels that carry large activations
lose least to rounding when their weights are scaled up and the scale is folded into what feeds
them (AWQ's idea, searched per group on the use case's own prompts).

For each decoder block and each group of linears that share an input, a per-channel scale
``s = mean|x|^alpha`` (normalised) multiplies the linears' weight columns and divides what
produces ``x``: the RMSNorm before q/k/v, the RMSNorm before gate/up, and up_proj's output rows
before down_proj (exact: the MLP's product is linear in up's output). In fp32 the scaled model
computes the same function; what changes is which weights the 4-bit grid serves well. ``alpha``
is chosen per group from a grid by the output error of the group's linears quantised as the
export quantises them (symmetric int4, blocks of ``block_size`` along the input), alpha 0 being
plain rounding, so a group the scaling does not help is left as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lifecycle_dagster.ml.progress import Log

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MAX_TOKENS = 1024  # calibration tokens per group (sampled evenly)
AWQ_FILE = "awq.json"


@dataclass
class AwqResult:
    alphas: dict[str, float] = field(default_factory=dict)  # "<block>.<group>" -> chosen alpha
    error_ratio: float = 1.0  # output error after / before, summed over groups


def fake_int4(weight, block_size: int):
    """``weight`` (out x in) rounded to symmetric int4 in blocks of ``block_size`` along the
    input dimension, and back."""
    import torch

    out_dim, in_dim = weight.shape
    pad = (-in_dim) % block_size
    w = torch.nn.functional.pad(weight, (0, pad)).reshape(out_dim, -1, block_size)
    scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 7.0
    q = (w / scale).round().clamp(-8, 7)
    return (q * scale).reshape(out_dim, -1)[:, :in_dim]


def _error(x, weights, scale, block_size: int) -> float:
    total = 0.0
    for w in weights:
        w_hat = fake_int4(w * scale, block_size) / scale
        total += float(((x @ (w - w_hat).T) ** 2).sum())
    return total


def _search(x, weights, block_size: int) -> tuple[float, object, float, float]:
    """The alpha (and its scale) whose quantised outputs are closest to the exact ones; with the
    errors at alpha 0 and at the chosen alpha."""
    import torch

    mean_abs = x.abs().mean(0).clamp(min=1e-6)
    best = (0.0, torch.ones_like(mean_abs), float("inf"))
    plain = None
    for alpha in ALPHAS:
        s = mean_abs**alpha
        s = s / (s.max() * s.min()).sqrt()
        err = _error(x, weights, s, block_size)
        if alpha == 0.0:
            plain = err
        if err < best[2]:
            best = (alpha, s, err)
    return best[0], best[1], plain or 0.0, best[2]


def _capture(model, tokenizer, texts: list[str], modules: dict[str, object]) -> dict:
    """The inputs each of ``modules`` (name -> module) sees over ``texts`` in one pass, as
    (tokens x in) tensors of about MAX_TOKENS rows, sampled evenly from every text."""
    import torch

    per_text = max(1, MAX_TOKENS // max(1, len(texts)))
    seen: dict[str, list] = {n: [] for n in modules}

    def hook(name):
        def fn(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            rows = torch.linspace(0, len(x) - 1, min(per_text, len(x))).long()
            seen[name].append(x[rows].float())

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for text in texts:
                enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
                model(**enc)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}


def scale_model(model, tokenizer, texts: list[str], block_size: int, log: Log | None = None):
    """Fold activation-aware scales into ``model`` (a Llama-style decoder, fp32) in place."""
    import torch

    result = AwqResult()
    before = after = 0.0
    layers = model.model.layers
    # Every input, captured before any scale is folded in (each group's search uses its own).
    modules = {}
    for i, layer in enumerate(layers):
        modules |= {
            f"{i}.qkv": layer.self_attn.q_proj,
            f"{i}.gate_up": layer.mlp.gate_proj,
            f"{i}.down": layer.mlp.down_proj,
        }
    captured = _capture(model, tokenizer, texts, modules)
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        xs = {n.split(".", 1)[1]: x for n, x in captured.items() if n.startswith(f"{i}.")}
        groups = (
            ("qkv", [attn.q_proj, attn.k_proj, attn.v_proj], layer.input_layernorm, None),
            ("gate_up", [mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm, None),
            ("down", [mlp.down_proj], None, mlp.up_proj),
        )
        with torch.no_grad():
            for name, linears, norm, producer in groups:
                weights = [lin.weight.float() for lin in linears]
                alpha, s, plain, best = _search(xs[name], weights, block_size)
                before, after = before + plain, after + best
                result.alphas[f"{i}.{name}"] = alpha
                if alpha == 0.0:
                    continue
                for lin in linears:
                    lin.weight.mul_(s.to(lin.weight.dtype))
                if norm is not None:
                    norm.weight.div_(s.to(norm.weight.dtype))
                else:  # up_proj's output rows feed down_proj's input columns
                    producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
        if log and (i + 1) % 8 == 0:
            log(f"awq: {i + 1}/{len(layers)} blocks scaled")
    result.error_ratio = after / before if before else 1.0
    return result


def scaled_copy(
    model_dir: Path, out_dir: Path, texts: list[str], block_size: int, log: Log | None = None
) -> AwqResult:
    """``model_dir`` with activation-aware scales folded in, saved (safetensors) to ``out_dir``
    beside its tokenizer and configs; ``awq.json`` records the alphas chosen."""
    import torch
    from transformers import AutoModelForCausalLM

    from lifecycle_dagster.ml.models import LOAD_KW, load_tokenizer, save_beside

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=True, **LOAD_KW
    ).eval()
    tokenizer = load_tokenizer(model_dir)
    result = scale_model(model, tokenizer, texts, block_size, log)
    save_beside(model, model_dir, out_dir)
    (Path(out_dir) / AWQ_FILE).write_text(
        json.dumps({"error_ratio": result.error_ratio, "alphas": result.alphas}, indent=2)
    )
    if log:
        log(
            f"awq: int4 output error x{result.error_ratio:.2f} of plain rounding on the "
            f"calibration prompts ({sum(a > 0 for a in result.alphas.values())} of "
            f"{len(result.alphas)} groups scaled)"
        )
    return result
