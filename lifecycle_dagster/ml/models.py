"""Model sources and loading: pre-trained from scratch, a local HF directory, a GGUF file, a hub id.

Every model the pipeline writes is safetensors; loading never runs remote code.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lifecycle_dagster.ml.progress import Log
from lifecycle_dagster.ml.runtime import Runtime

LOAD_KW = {"trust_remote_code": False}


@dataclass
class BaseModelResult:
    path: Path
    source: str
    parameters: int
    architecture: str
    vocab_size: int
    context_length: int
    pretrain: dict = field(default_factory=dict)


def materialize_base_model(
    spec, corpus: list[str], out_dir: Path, runtime: Runtime, log: Log | None = None
) -> BaseModelResult:
    """Write the base model named by a ``BaseModelSpec`` into ``out_dir`` as safetensors."""
    from lifecycle_dagster.ml.pretrain import PretrainConfig, pretrain

    out_dir = Path(out_dir)
    info: dict = {}
    if spec.source == "scratch":
        s = spec.scratch
        result = pretrain(
            corpus,
            out_dir,
            PretrainConfig(
                vocab_size=s.vocab_size,
                hidden_size=s.hidden_size,
                num_layers=s.num_layers,
                num_heads=s.num_heads,
                num_kv_heads=s.num_kv_heads,
                intermediate_size=s.intermediate_size,
                context_length=s.context_length,
                steps=s.steps,
                batch_size=s.batch_size,
                learning_rate=s.learning_rate,
                seed=s.seed,
            ),
            device=runtime.device,
            log=log,
        )
        info = {
            "loss_start": result.loss_start,
            "loss_end": result.loss_end,
            "tokens_seen": result.tokens_seen,
            "loss_curve": result.loss_curve,
        }
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = dict(LOAD_KW)
        if spec.source == "gguf":
            src, kwargs["gguf_file"] = str(Path(spec.path).parent), Path(spec.path).name
        else:
            src = spec.path
            kwargs["revision"] = spec.revision
            kwargs["use_safetensors"] = True
        if log:
            log(f"base_model: loading {spec.source} model from {spec.path}")
        model = AutoModelForCausalLM.from_pretrained(src, dtype="float32", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        if spec.source == "local":
            for extra in ("generation_config.json",):
                if (Path(src) / extra).exists() and not (out_dir / extra).exists():
                    shutil.copy(Path(src) / extra, out_dir / extra)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out_dir, **LOAD_KW)
    return BaseModelResult(
        path=out_dir,
        source=spec.source,
        parameters=count_parameters(out_dir),
        architecture=config.architectures[0] if config.architectures else config.model_type,
        vocab_size=config.vocab_size,
        context_length=getattr(config, "max_position_embeddings", 0),
        pretrain=info,
    )


def count_parameters(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in Path(path).glob("*.safetensors"):
        with safe_open(file, "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                total += _prod(fh.get_slice(key).get_shape())
    return total


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def load_tokenizer(path: Path, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, **LOAD_KW)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(path: Path, runtime: Runtime, adapter: Path | None = None):
    """A causal LM (optionally with a peft adapter on top) in eval mode on the runtime's device."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if runtime.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **LOAD_KW)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.to(runtime.device).eval()


def model_dir_of(artifact: Path) -> Path:
    """The HF model directory inside an artifact (artifacts keep the model under ``model/``)."""
    artifact = Path(artifact)
    return artifact / "model" if (artifact / "model").is_dir() else artifact
