"""Export settings refused before the model builder starts."""

import json

import pytest

from lifecycle_dagster.ml.export import ExportConfig, export_onnx


def test_k_quant_on_an_odd_count_of_blocks_is_refused_before_any_export(tmp_path):
    """576 inputs are 9 blocks of 64: onnxruntime's k-quant cannot pack them; the error names the
    file, the field and the settings that work, and nothing is written."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 576, "intermediate_size": 1536}))
    config = ExportConfig(variants=["fp32", "int4"], block_size=64, int4_algorithm="k_quant")
    with pytest.raises(ValueError, match=r"config.json: hidden_size 576 is 9 blocks .* use int4_"):
        export_onnx(model, tmp_path / "onnx", config)
    assert not (tmp_path / "onnx").exists()
