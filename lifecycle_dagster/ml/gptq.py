"""Calibrated rounding of an exported int4 model (GPTQ, with the export's own grid).

The model builder picks each block's scale and zero point and rounds every weight to the nearest
level. Rounding each weight on its own ignores that the errors of weights which see correlated
inputs add up in the output. GPTQ rounds one input column at a time and moves the columns not yet
rounded to absorb the error, weighted by the inputs' second moments ``H = X^T X`` measured on the
use case's own prompts; columns are taken in order of decreasing ``diag(H)``.

Only the integer codes change: the builder's scales and zero points stay, so the graph, its
operators and its size are the same as the export's. Blocks are done in order, each one's inputs
computed by the blocks before it with their new weights (as ONNX will compute them). A matrix
whose output error on the calibration tokens calibrated rounding does not lower keeps the
nearest rounding, so the result is never worse on the prompts it was measured on.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lifecycle_dagster.ml.progress import Log

GPTQ_FILE = "gptq.json"
MODEL_FILE = "model.onnx"
DAMP = 0.01  # of the mean of diag(H), added to its diagonal
COLUMNS = 128  # columns rounded before the rest are updated (lazy batch)
NODE = re.compile(r"model\.layers\.(\d+)\.(attn|mlp)\.(\w+)\.MatMul\.weight_Q4G\d+$")
TORCH = {  # the builder's names for a block's matrices -> the torch modules they may be made of
    "qkv_proj": (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.qkv_proj",),  # fused (Phi-3)
    ),
    "q_proj": (("self_attn.q_proj",),),
    "k_proj": (("self_attn.k_proj",),),
    "v_proj": (("self_attn.v_proj",),),
    "o_proj": (("self_attn.o_proj",),),
    "gate_proj": (("mlp.gate_proj",),),
    "up_proj": (("mlp.up_proj",),),
    "gate_up_proj": (("mlp.gate_up_proj",),),
    "down_proj": (("mlp.down_proj",),),
}


@dataclass
class GptqResult:
    matrices: int = 0
    kept_nearest: int = 0  # matrices calibrated rounding did not improve
    error_ratio: float = 1.0  # output error after / with nearest rounding, summed over matrices
    per_block: dict[int, float] = field(default_factory=dict)


@dataclass
class _Matrix:
    """One MatMulNBits int4 weight: its initializers and its grid, row-major (out x in)."""

    node: str
    codes: str  # initializer names
    scales: str
    zero_points: str | None
    modules: tuple[str, ...]
    block_size: int
    scale: object = None  # torch (out x blocks)
    zero: object = None


def unpack_int4(packed, columns: int):
    """(out, blocks, block_size / 2) bytes, low nibble first -> (out, columns) codes 0..15."""
    import numpy as np

    low, high = packed & 0x0F, packed >> 4
    codes = np.stack([low, high], axis=-1).reshape(packed.shape[0], -1)
    return codes[:, :columns]


def pack_int4(codes, blocks: int, block_size: int):
    """(out, columns) codes 0..15 -> (out, blocks, block_size / 2) bytes, low nibble first."""
    import numpy as np

    out, columns = codes.shape
    padded = np.zeros((out, blocks * block_size), dtype=np.uint8)
    padded[:, :columns] = codes
    pairs = padded.reshape(out, blocks, block_size // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def unpack_zero_points(packed, out: int, blocks: int):
    import numpy as np

    if packed is None:
        return np.full((out, blocks), 8, dtype=np.uint8)
    packed = packed.reshape(out, -1)
    both = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(out, -1)
    return both[:, :blocks]


def round_columns(weight, hessian, scale, zero, block_size: int):
    """GPTQ on ``weight`` (out x in, float) against the fixed grid ``(code - zero) * scale``
    (out x blocks each): the codes (out x in, int) and the output errors
    ``tr(E H E^T)`` of nearest rounding and of the codes."""
    import torch

    w = weight.clone().float()
    h = hessian.clone().float()
    columns = w.shape[1]
    dead = torch.diag(h) == 0  # inputs never seen: rounded to nearest, nothing to spread
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diag(h), descending=True)
    group = order // block_size  # each column keeps the block (scale) it came from
    w, h = w[:, order], h[order][:, order]
    inverse = _inverse_factor(h)
    s, z = scale[:, group].clone(), zero[:, group]
    s[s == 0] = 1.0  # an all-zero block: any code of its zero point is exact
    codes = torch.zeros_like(w, dtype=torch.int64)
    for start in range(0, columns, COLUMNS):
        end = min(start + COLUMNS, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        inv = inverse[start:end, start:end]
        for i in range(end - start):
            col = start + i
            q = torch.clamp(torch.round(block[:, i] / s[:, col]) + z[:, col], 0, 15)
            codes[:, col] = q.long()
            err = (block[:, i] - (q - z[:, col]) * s[:, col]) / inv[i, i]
            block[:, i:] -= err.unsqueeze(1) * inv[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ inverse[start:end, end:]
    back = torch.argsort(order)
    codes = codes[:, back]
    return codes, *_errors(weight, hessian, codes, scale, zero, block_size)


def _inverse_factor(h):
    """The upper Cholesky factor of ``H^-1`` (damped); more damping until ``H`` factorises."""
    import torch

    eye = torch.eye(len(h), dtype=h.dtype, device=h.device)
    mean = torch.mean(torch.diag(h))
    for damp in (DAMP, 0.1, 1.0):
        try:
            chol = torch.linalg.cholesky(h + damp * mean * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError("the calibration inputs' second moments do not factorise")


def _groups(columns: int, block_size: int, device):
    import torch

    return torch.arange(columns, device=device) // block_size


def dequantize(codes, scale, zero, block_size: int):
    group = _groups(codes.shape[1], block_size, codes.device)
    return (codes.float() - zero[:, group].float()) * scale[:, group]


def _errors(weight, hessian, codes, scale, zero, block_size: int) -> tuple[float, float]:
    """Output error of nearest rounding, and of ``codes``, on the calibration inputs."""
    import torch

    group = _groups(weight.shape[1], block_size, weight.device)
    s, z = scale[:, group], zero[:, group].float()
    nearest = torch.clamp(torch.round(weight / torch.where(s == 0, 1.0, s)) + z, 0, 15)
    found = []
    for c in (nearest, codes):
        e = weight - (c.float() - z) * s
        found.append(float(torch.einsum("oi,ij,oj->", e, hessian, e)))
    return found[0], found[1]


def refine(model_dir: Path, folder: Path, texts: list[str], log: Log | None = None) -> GptqResult:
    """Re-round the int4 weights of the export in ``folder`` (made from ``model_dir``) by GPTQ on
    ``texts``; the graph is rewritten in place and ``gptq.json`` records what changed."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import AutoModelForCausalLM

    from lifecycle_dagster.ml.models import LOAD_KW, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(folder) / MODEL_FILE
    graph = onnx.load(str(path))
    inits = {t.name: t for t in graph.graph.initializer}
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=True, **LOAD_KW
    )
    model = model.to(device).eval()
    tokenizer = load_tokenizer(model_dir)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{model_dir}: not a decoder whose blocks are model.model.layers")
    matrices = _matrices(graph, layers[0])
    if not matrices:
        raise ValueError(f"{path}: no int4 matrix of a decoder block found to re-round")
    for m in (m for ms in matrices.values() for m in ms):
        out = sum(layers[0].get_submodule(n).weight.shape[0] for n in m.modules)
        blocks = numpy_helper.to_array(inits[m.scales]).reshape(out, -1).shape[1]
        m.scale = torch.tensor(numpy_helper.to_array(inits[m.scales]).reshape(out, -1))
        zp = numpy_helper.to_array(inits[m.zero_points]) if m.zero_points else None
        m.zero = torch.from_numpy(unpack_zero_points(zp, out, blocks).astype(np.int64))
        m.scale, m.zero = m.scale.to(device).float(), m.zero.to(device)

    result = GptqResult()
    before = after = 0.0
    hidden, kwargs = _first_inputs(model, tokenizer, texts, device)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            hessians = _hessians(layer, hidden, kwargs, matrices.get(i, []))
            b_block = a_block = 0.0
            for m in matrices.get(i, []):
                linears = [layer.get_submodule(n) for n in m.modules]
                weight = torch.cat([lin.weight.float() for lin in linears])
                codes, nearest, found = round_columns(
                    weight, hessians[m.modules[0]], m.scale, m.zero, m.block_size
                )
                result.matrices += 1
                if not found < nearest:  # the builder's own codes stay
                    result.kept_nearest += 1
                    found = nearest
                    own = numpy_helper.to_array(inits[m.codes])
                    codes = torch.from_numpy(unpack_int4(own, weight.shape[1]).astype(np.int64))
                    codes = codes.to(device)
                b_block, a_block = b_block + nearest, a_block + found
                new = dequantize(codes, m.scale, m.zero, m.block_size)
                rows = 0
                for lin in linears:  # later blocks see what ONNX will compute
                    lin.weight.copy_(new[rows : rows + lin.weight.shape[0]])
                    rows += lin.weight.shape[0]
                blocks = m.scale.shape[1]
                packed = pack_int4(codes.cpu().numpy().astype(np.uint8), blocks, m.block_size)
                inits[m.codes].CopyFrom(numpy_helper.from_array(packed, m.codes))
            before, after = before + b_block, after + a_block
            result.per_block[i] = a_block / b_block if b_block else 1.0
            hidden = [_layer_out(layer, h, kw) for h, kw in zip(hidden, kwargs, strict=True)]
            if log and (i + 1) % 8 == 0:
                log(f"gptq: {i + 1}/{len(layers)} blocks rounded")
    result.error_ratio = after / before if before else 1.0
    save_whole(graph, path)
    (Path(folder) / GPTQ_FILE).write_text(
        json.dumps(
            {
                "error_ratio": result.error_ratio,
                "matrices": result.matrices,
                "kept_nearest": result.kept_nearest,
                "calibration_texts": len(texts),
                "per_block": result.per_block,
            },
            indent=2,
        )
    )
    if log:
        log(
            f"gptq: int4 output error x{result.error_ratio:.2f} of nearest rounding on "
            f"{len(texts)} calibration prompts ({result.matrices - result.kept_nearest} of "
            f"{result.matrices} matrices re-rounded)"
        )
    return result


def _matrices(graph, layer) -> dict[int, list[_Matrix]]:
    """The graph's int4 MatMulNBits weights that belong to a decoder block and whose torch
    modules ``layer`` (a block of the model) has, by block; any other keeps its rounding."""
    found: dict[int, list[_Matrix]] = {}

    def modules_of(name: str) -> tuple[str, ...] | None:
        for names in TORCH.get(name, ()):
            try:
                for n in names:
                    layer.get_submodule(n)
            except AttributeError:
                continue
            return names
        return None

    for node in graph.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 3:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        match = NODE.match(node.input[1])
        modules = modules_of(match.group(3)) if match and attrs.get("bits") == 4 else None
        if modules is None:
            continue
        found.setdefault(int(match.group(1)), []).append(
            _Matrix(
                node=node.name,
                codes=node.input[1],
                scales=node.input[2],
                zero_points=node.input[3] if len(node.input) > 3 and node.input[3] else None,
                modules=modules,
                block_size=attrs["block_size"],
            )
        )
    return found


class _Stop(Exception):
    pass


def _first_inputs(model, tokenizer, texts, device) -> tuple[list, list]:
    """What the first decoder block receives for each text: hidden states and keyword arguments
    (positions, rotary embeddings, mask), the same for every block."""
    import torch

    hidden, kwargs = [], []

    def grab(_module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for text in texts:
                enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
                with contextlib.suppress(_Stop):
                    model(**enc, use_cache=False)
    finally:
        handle.remove()
    return hidden, kwargs


def _layer_out(layer, hidden, kwargs):
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _hessians(layer, hidden, kwargs, matrices: list[_Matrix]) -> dict[str, object]:
    """``X^T X / tokens`` of the inputs of each matrix's first module, over every text."""
    names = {m.modules[0] for m in matrices}
    sums: dict[str, object] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + len(x)

        return fn

    handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for h, kw in zip(hidden, kwargs, strict=True):
            _layer_out(layer, h, kw)
    finally:
        for handle in handles:
            handle.remove()
    return {n: sums[n] / counts[n] for n in names}


def save_whole(graph, path: Path) -> None:
    """The graph and its weights written whole in a folder beside them, then moved over them."""
    import os
    import shutil

    import onnx

    tmp = path.parent / ".gptq"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    data = path.name + ".data"
    onnx.save_model(graph, str(tmp / path.name), save_as_external_data=True, location=data)
    for name in (path.name, data):  # keep the modes the export gave them
        os.chmod(tmp / name, (path.parent / name).stat().st_mode & 0o777)
    os.replace(tmp / data, path.parent / data)
    os.replace(tmp / path.name, path)
    tmp.rmdir()
