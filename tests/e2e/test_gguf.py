"""The demo's real foundation model: SmolLM2-135M-Instruct from its GGUF file (`make models`)."""

import json
import os
from pathlib import Path

import pytest

from lifecycle_dagster.ml.models import convert_gguf, count_parameters, load_tokenizer

GGUF = Path(
    os.environ.get(
        "LIFECYCLE_DEMO_GGUF",
        str(
            Path(__file__).resolve().parents[2]
            / ".lifecycle"
            / "models"
            / "SmolLM2-135M-Instruct.Q4_1.gguf"
        ),
    )
)

pytestmark = pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} not fetched (make models)")


def test_gguf_converts_once_to_safetensors_and_is_reused(tmp_path):
    cache = tmp_path / "cache"
    first = convert_gguf(GGUF, tmp_path / "a", cache_dir=cache)
    assert first["conversion"] == "converted"
    second = convert_gguf(GGUF, tmp_path / "b", cache_dir=cache)
    assert second["conversion"] == "reused" and second["gguf_sha256"] == first["gguf_sha256"]
    for out in (tmp_path / "a", tmp_path / "b"):
        assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    assert 130e6 < count_parameters(tmp_path / "b") < 140e6
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    tok = load_tokenizer(tmp_path / "b")
    text = "Anna books a table for two on Friday at 7 pm."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
