"""Model sources and loading: pre-trained from scratch, a local HF directory, a GGUF file, a hub id.

Every model the pipeline writes is safetensors; loading never runs remote code.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lifecycle_dagster.ml.estimate import Feasibility
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
    # What pre-training and fine-tuning a model of this size would cost on this machine.
    feasibility: Feasibility | None = None


def materialize_base_model(
    spec,
    corpus: list[str],
    out_dir: Path,
    runtime: Runtime,
    log: Log | None = None,
    cache_dir: Path | None = None,
    adaptation=None,
) -> BaseModelResult:
    """Write the base model named by a ``BaseModelSpec`` into ``out_dir`` as safetensors, with the
    cost of pre-training such a model here and of fine-tuning it with ``adaptation``
    (an ``SFTMethodConfig``; the defaults when None)."""
    from lifecycle_dagster.ml.estimate import estimate
    from lifecycle_dagster.ml.pretrain import pretrain

    out_dir = Path(out_dir)
    info: dict = {}
    if spec.source == "scratch":
        result = pretrain(
            corpus,
            out_dir,
            spec.scratch,
            device=runtime.device,
            log=log,
        )
        info = {
            "loss_start": result.loss_start,
            "loss_end": result.loss_end,
            "tokens_seen": result.tokens_seen,
            "loss_curve": result.loss_curve,
        }
    elif spec.source == "gguf":
        info = convert_gguf(Path(spec.path), out_dir, cache_dir=cache_dir, log=log)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {**LOAD_KW, "revision": spec.revision}
        if log:
            log(f"base_model: loading {spec.source} model from {spec.path}")
        model = AutoModelForCausalLM.from_pretrained(
            spec.path, dtype="float32", use_safetensors=True, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(spec.path, **kwargs)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out_dir, **LOAD_KW)
    parameters = count_parameters(out_dir)
    return BaseModelResult(
        path=out_dir,
        source=spec.source,
        parameters=parameters,
        architecture=config.architectures[0] if config.architectures else config.model_type,
        vocab_size=config.vocab_size,
        context_length=getattr(config, "max_position_embeddings", 0),
        pretrain=info,
        feasibility=estimate(
            parameters,
            device=runtime.device,
            hidden=getattr(config, "hidden_size", None),
            layers=getattr(config, "num_hidden_layers", None),
            adaptation=adaptation,
        ),
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


def source_tokenizer(spec, cache_dir: Path | None = None):
    """The tokenizer and context length of the model a ``BaseModelSpec`` names, without loading
    its weights: a local directory's, a GGUF file's (from its conversion when cached), a hub id's
    when it is in the local cache. None for a model pre-trained from scratch (its tokenizer is
    trained from the data) or a hub model not cached here."""
    from transformers import AutoConfig, AutoTokenizer

    kwargs: dict = dict(LOAD_KW)
    where: str | Path = str(spec.path)
    if spec.source == "scratch":
        return None
    if spec.source == "gguf":
        from lifecycle_dagster.ml.artifacts import file_sha256

        gguf = Path(spec.path)
        cached = Path(cache_dir) / file_sha256(gguf)[:16] if cache_dir else None
        if cached is not None and (cached / "MANIFEST.json").exists():
            where = cached
        else:
            where, kwargs["gguf_file"] = gguf.parent, gguf.name
    elif spec.source == "hub":
        kwargs |= {"revision": spec.revision, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        config = AutoConfig.from_pretrained(where, **kwargs)
    except OSError:
        if spec.source == "hub":
            return None
        raise
    return tokenizer, getattr(config, "max_position_embeddings", None)


def load_causal_lm(
    path: Path, runtime: Runtime, adapter: Path | None = None, training: bool = False
):
    """A causal LM (optionally with a peft adapter on top) in eval mode on the runtime's device.

    Inference loads bf16 where the runtime supports it; training keeps fp32 master weights and
    lets the trainer autocast, so small updates are not lost to bf16 rounding.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if runtime.bf16 and not training else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **LOAD_KW)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.to(runtime.device).eval()


def model_dir_of(artifact: Path) -> Path:
    """The HF model directory inside an artifact (artifacts keep the model under ``model/``)."""
    artifact = Path(artifact)
    return artifact / "model" if (artifact / "model").is_dir() else artifact


def convert_gguf(
    gguf: Path, out_dir: Path, *, cache_dir: Path | None = None, log: Log | None = None
) -> dict:
    """Dequantise a GGUF file into a safetensors model directory (tokenizer, chat template too).

    The conversion is cached by the file's sha256 under ``cache_dir``: the same GGUF is converted
    once; a changed file converts again (and so gives the base model a new DataVersion).
    """
    from lifecycle_dagster.ml.artifacts import atomic_dir, file_sha256

    digest = file_sha256(gguf)
    info = {"gguf_sha256": digest, "conversion": "converted"}
    if cache_dir is None:
        _convert_gguf(gguf, out_dir)
        return info
    cached = Path(cache_dir) / digest[:16]
    if (cached / "MANIFEST.json").exists():
        info["conversion"] = "reused"
        if log:
            log(f"base_model: reusing the conversion of {gguf.name} (sha256 {digest[:12]})")
    else:
        if log:
            log(f"base_model: converting {gguf.name} (sha256 {digest[:12]}) to safetensors")
        with atomic_dir(cached, {"gguf_sha256": digest, "source": str(gguf)}) as tmp:
            _convert_gguf(gguf, tmp)
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in cached.iterdir():
        if item.name != "MANIFEST.json":
            _link_or_copy(item, out_dir / item.name)
    return info


def _convert_gguf(gguf: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {**LOAD_KW, "gguf_file": gguf.name}
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # A GGUF-loaded model refuses to serialise; copy its (dequantised) weights into a plain model
    # of the same config.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link large files from the cache (same filesystem), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_beside(model, source_dir: Path, out_dir: Path) -> None:
    """``model``'s weights (safetensors) in ``out_dir`` with everything else of ``source_dir``:
    tokenizer, generation config, prompt format."""
    import shutil

    shutil.copytree(
        source_dir, out_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.*")
    )
    model.save_pretrained(out_dir, safe_serialization=True)
