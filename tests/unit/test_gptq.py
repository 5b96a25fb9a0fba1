"""Calibrated rounding of int4 codes: they pack as MatMulNBits reads them, and GPTQ lowers the
output error nearest rounding leaves (a re-rounded export: tests/e2e/test_exports.py)."""

import numpy as np
import pytest
import torch

from lifecycle_dagster.ml.gptq import (
    dequantize,
    pack_int4,
    round_columns,
    unpack_int4,
    unpack_zero_points,
)


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
