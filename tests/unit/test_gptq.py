"""Calibrated rounding of an int4 export: codes pack as MatMulNBits reads them, GPTQ lowers the
output error nearest rounding leaves, and a re-rounded export runs closer to its model."""

import json
import shutil

import numpy as np
import pytest
import torch

from lifecycle_dagster.ml.export import ExportConfig, export_onnx
from lifecycle_dagster.ml.gptq import (
    GPTQ_FILE,
    dequantize,
    pack_int4,
    refine,
    round_columns,
    unpack_int4,
    unpack_zero_points,
)
from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer
from lifecycle_dagster.ml.runtimes import OrtDecoder


def weights(folder) -> dict:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(folder / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}


def test_codes_pack_low_nibble_first_per_block():
    codes = np.random.default_rng(0).integers(0, 16, size=(3, 40), dtype=np.uint8)
    packed = pack_int4(codes, blocks=2, block_size=32)  # 40 columns padded to 64
    assert packed.shape == (3, 2, 16)
    assert packed[0, 0, 0] == codes[0, 0] | (codes[0, 1] << 4)
    assert (unpack_int4(packed, 40) == codes).all()
    zp = np.array([[0x21], [0x43], [0x65]], dtype=np.uint8)  # 2 blocks a row, packed in a byte
    assert unpack_zero_points(zp, 3, 2).tolist() == [[1, 2], [3, 4], [5, 6]]
    assert unpack_zero_points(None, 3, 2).tolist() == [[8, 8]] * 3  # symmetric


def test_calibrated_rounding_lowers_the_output_error_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 64, generator=g)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g)  # correlated
    x += 0.1 * torch.randn(512, 64, generator=g)
    hessian = x.T @ x / len(x)
    blocks = weight.reshape(24, 2, 32)
    low, high = blocks.amin(-1), blocks.amax(-1)
    scale = (high - low) / 15
    zero = torch.round(-low / scale).long()
    codes, nearest, found = round_columns(weight, hessian, scale, zero, 32)
    assert codes.min() >= 0 and codes.max() <= 15
    assert found < 0.7 * nearest, (found, nearest)
    e = weight - dequantize(codes, scale, zero, 32)
    assert float(torch.einsum("oi,ij,oj->", e, hessian, e)) == pytest.approx(found, rel=1e-4)


def test_a_re_rounded_export_runs_closer_to_its_model(tiny_base, prompts, runtime, tmp_path):
    config = ExportConfig(variants=["fp32", "int4"], int4_keep_int8="lm_head")
    exported = export_onnx(tiny_base, tmp_path / "onnx", config)
    plain = tmp_path / "plain"
    shutil.copytree(exported.variants["int4"], plain)
    result = refine(tiny_base, exported.variants["int4"], prompts[:16])

    assert result.matrices == 2 * 5 and result.error_ratio < 1.0
    assert json.loads((exported.variants["int4"] / GPTQ_FILE).read_text())["matrices"] == 10
    before, after = (weights(f) for f in (plain, exported.variants["int4"]))
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all("weight_Q4" in k for k in changed)  # the grid stays: only codes move
    model, tok = load_causal_lm(tiny_base, runtime), load_tokenizer(tiny_base)
    decoders = {"plain": OrtDecoder(plain), "gptq": OrtDecoder(exported.variants["int4"])}
    gaps = dict.fromkeys(decoders, 0.0)
    for prompt in prompts[:16]:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = model(torch.tensor([ids], device=model.device)).logits[0].float().cpu().numpy()
        for name, decoder in decoders.items():
            gaps[name] += float(((decoder.prefill_logits(ids) - ref) ** 2).mean())
    assert gaps["gptq"] < gaps["plain"], gaps
