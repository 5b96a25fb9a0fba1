"""Export to ONNX with KV cache and quantise.

The export uses onnxruntime-genai's model builder (decoder-only transformers with a KV cache, fused
attention; every variant of one export in one child process, ``ml.onnx_builder``): fp32,
weight-only int8 and int4 (MatMulNBits), and optionally onnxruntime's dynamic int8. Running the artifact is ``ml.runtimes``; proving it against PyTorch is
``ml.faithfulness``.

Tokens the source model's generation config suppresses (a baked soft prompt's, see ``ml.soft_prompt``)
are masked in the graph's logits, so onnxruntime never generates them either; the checks against
PyTorch compare the other logits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lifecycle_dagster.ml.awq import AWQ_FILE, scaled_copy
from lifecycle_dagster.ml.gptq import refine
from lifecycle_dagster.ml.progress import Log
from lifecycle_dagster.ml.tunables import Tunables

MODEL_FILE = "model.onnx"
# Added to the logits of suppressed tokens in the graph: far below any real logit, finite in fp16.
SUPPRESSED_LOGIT = -1e4

# What each variant is. int8/int4 are weight-only (MatMulNBits, blocks of ``block_size`` along the
# input dimension, symmetric), exported by the model builder; int4 also quantises the embedding table
# (GatherBlockQuantized, shared with the LM head when the model ties them). int8_dynamic is
# onnxruntime's dynamic quantisation (int8 weights and activations) of the fp32 export.
VARIANTS = {
    "fp32": "fp32 weights and activations",
    "int8": "int8 weight-only (MatMulNBits), fp32 embedding",
    "int4": "int4 weight-only (MatMulNBits + GatherBlockQuantized embedding)",
    "int8_dynamic": "int8 weights and activations (quantize_dynamic)",
}


Variant = Literal["fp32", "int8", "int4", "int8_dynamic"]


def describe(variant: str) -> str:
    """What a variant is: one of ``VARIANTS``, or ``<student>_<precision>`` (a pruned or distilled
    student of the model, exported in that precision)."""
    if variant in VARIANTS:
        return VARIANTS[variant]
    student, _, precision = variant.rpartition("_")
    return f"the {student} student, {VARIANTS.get(precision, precision)}"


class ExportConfig(Tunables):
    """The ONNX export: which variants, and how int8/int4 weights are quantised."""

    variants: list[Variant] = Field(
        default_factory=lambda: ["fp32", "int8", "int4"],
        description="ONNX variants to export; fp32 is required (the others are checked against it).",
    )
    block_size: Literal[16, 32, 64, 128, 256] = Field(
        32, description="Weight-only int8/int4: weights per quantisation block."
    )
    accuracy_level: Literal[1, 2, 3, 4] = Field(
        4, description="MatMulNBits activations: 4 int8 (fast on CPU), 1 fp32."
    )
    # k_quant picks scales that minimise the weighted error (RTN rounds to nearest); mixed precision
    # keeps the LM head and the most sensitive layers (llama.cpp's Q4_K_M choice: first and last
    # eighth, every third layer's qkv/v/down) in int8.
    int4_algorithm: Literal["rtn", "k_quant"] = Field(
        "k_quant", description="int4 scales: round to nearest, or k-quant (lower weighted error)."
    )
    int4_keep_int8: Literal["none", "lm_head", "lm_head_and_sensitive"] = Field(
        "lm_head_and_sensitive",
        description="int4: what stays int8: nothing, the LM head, or the LM head and the most "
        "sensitive layers (llama.cpp's Q4_K_M choice).",
    )
    int4_awq: bool = Field(
        False,
        description="int4: fold activation-aware scales, searched on the use case's train "
        "prompts, into the norms before quantising (ml.awq).",
    )
    int4_gptq: bool = Field(
        True,
        description="int4: re-round the exported codes by GPTQ on the use case's train prompts "
        "(the builder's scales and zero points kept; ml.gptq).",
    )
    calibration_prompts: int = Field(
        32,
        gt=0,
        description="int4 with int4_awq or int4_gptq: train examples (prompt and reference "
        "answer) calibrated on.",
    )
    lm_head_tokens: int | None = Field(
        None,
        gt=0,
        description="int4: keep only the LM head rows of the use case's train tokens, those "
        "the variant writes after train prompts, the special tokens and this many of the "
        "vocabulary's first (most frequent) ids; the others are never generated (ml.lm_head). "
        "None keeps the whole vocabulary.",
    )

    @model_validator(mode="before")
    @classmethod
    def _older_int4_name(cls, data):
        """``int4_mixed_precision`` (a bool), the option's name before the LM head alone could be
        kept: true is the head and the sensitive layers, false nothing."""
        if isinstance(data, dict) and "int4_mixed_precision" in data:
            data = dict(data)
            mixed = data.pop("int4_mixed_precision")
            data.setdefault("int4_keep_int8", "lm_head_and_sensitive" if mixed else "none")
        return data

    @field_validator("variants")
    @classmethod
    def _fp32_first(cls, v: list[str]) -> list[str]:
        if "fp32" not in v:
            raise ValueError("must include fp32: the other variants are checked against it")
        return ["fp32", *dict.fromkeys(x for x in v if x != "fp32")]


@dataclass
class ExportResult:
    path: Path
    variants: dict[str, Path]
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def onnx_bytes(folder: Path) -> int:
    """Size on disk of the ONNX graph and its external weights."""
    return sum(p.stat().st_size for p in Path(folder).glob(f"{MODEL_FILE}*"))


def export_onnx(
    model_dir: Path,
    out_dir: Path,
    config: ExportConfig,
    log: Log | None = None,
    calibration: list[str] | None = None,
    prompts: list[str] | None = None,
) -> ExportResult:
    """Write one runnable onnxruntime-genai folder per variant under ``out_dir``; int4 calibrated
    on the first ``calibration_prompts`` of ``calibration`` (the use case's train texts) as
    ``config`` asks (``int4_awq``, ``int4_gptq``), its LM head trimmed to their tokens and those
    it writes after the train ``prompts`` (``lm_head_tokens``)."""
    out_dir = Path(out_dir)
    built = [name for name in config.variants if name != "int8_dynamic"]
    seconds = _export_all(
        [(model_dir, out_dir / name, name, name) for name in built],
        config,
        calibration,
        log,
        prompts,
    )
    if "int8_dynamic" in config.variants:  # from the fp32 export, its logits already masked
        start = time.monotonic()
        if log:
            log(f"onnx: exporting int8_dynamic ({VARIANTS['int8_dynamic']})")
        _quantize_dynamic(out_dir / "fp32", out_dir / "int8_dynamic")
        _plain_bytelevel_decoder(out_dir / "int8_dynamic")
        seconds["int8_dynamic"] = time.monotonic() - start
    variants = {name: out_dir / name for name in config.variants}
    return ExportResult(
        path=out_dir,
        variants=variants,
        sizes={name: onnx_bytes(path) for name, path in variants.items()},
        seconds={name: seconds[name] for name in variants},
    )


def export_students(
    students: dict[str, Path],
    precisions: list[str],
    exported: ExportResult,
    config: ExportConfig,
    log: Log | None = None,
    calibration: list[str] | None = None,
    prompts: list[str] | None = None,
) -> ExportResult:
    """Each student model exported in each of ``precisions`` (quantised as ``config`` says) into
    ``exported``'s folder as variant ``<student>_<precision>``, added to ``exported``."""
    specs = [
        (model_dir, exported.path / f"{student}_{precision}", f"{student}_{precision}", precision)
        for student, model_dir in students.items()
        for precision in precisions
    ]
    for name, took in _export_all(specs, config, calibration, log, prompts).items():
        exported.variants[name] = exported.path / name
        exported.sizes[name] = onnx_bytes(exported.path / name)
        exported.seconds[name] = took
    return exported


def _export_all(
    specs: list[tuple[Path, Path, str, str]],
    config: ExportConfig,
    calibration: list[str] | None,
    log: Log | None,
    prompts: list[str] | None = None,
) -> dict[str, float]:
    """Each (model directory, folder, variant name, precision) exported: planned, built in one
    model-builder process, finished. Returns seconds per variant."""
    with tempfile.TemporaryDirectory(prefix="int4-") as tmp:
        builds = [
            _plan(model_dir, folder, name, precision, config, calibration, Path(tmp), log)
            for model_dir, folder, name, precision in specs
        ]
        seconds = _build_all(builds, log)
        for b in builds:
            seconds[b.name] += _finish(b, config, calibration, log, prompts)
    return seconds


@dataclass
class _Build:
    """One model-builder export: ``source`` (the model, or its activation-aware scaled copy)
    written to ``folder`` in ``precision``; ``suppressed`` tokens masked in its logits after."""

    name: str
    source: Path
    folder: Path
    precision: str
    options: dict
    awq: bool
    gptq: bool
    suppressed: list[int]
    trim: bool  # the LM head cut to the use case's tokens


def _plan(
    model_dir: Path,
    folder: Path,
    name: str,
    precision: str,
    config: ExportConfig,
    calibration: list[str] | None,
    tmp: Path,
    log: Log | None,
) -> _Build:
    """How variant ``name`` is built; int4 from a copy with activation-aware scales folded in
    (``int4_awq``, made here in ``tmp``) and its codes re-rounded by GPTQ after (``int4_gptq``),
    both on ``calibration``."""
    if precision == "int4" and config.int4_algorithm == "k_quant":
        _check_k_quant_blocks(model_dir, config.block_size)
    calibrated = precision == "int4" and bool(calibration)
    awq = calibrated and config.int4_awq
    source = Path(model_dir)
    if awq:
        source = tmp / f"awq-{name}"
        scaled_copy(
            model_dir, source, calibration[: config.calibration_prompts], config.block_size, log
        )
    return _Build(
        name=name,
        source=source,
        folder=folder,
        precision=precision,
        options=_builder_options(precision, config),
        awq=awq,
        gptq=calibrated and config.int4_gptq,
        suppressed=suppressed_tokens(model_dir),
        trim=precision == "int4" and config.lm_head_tokens is not None,
    )


def _check_k_quant_blocks(model_dir: Path, block_size: int) -> None:
    """onnxruntime's k-quant packs a row's zero points two blocks a byte and fails on an odd
    number of blocks: refused here, before anything is built, with the settings that work."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    for name in ("hidden_size", "intermediate_size"):
        blocks = -(-cfg.get(name, 0) // block_size)
        if blocks % 2:
            raise ValueError(
                f"{Path(model_dir) / 'config.json'}: {name} {cfg[name]} is {blocks} blocks of "
                f"compression.block_size {block_size}, an odd count that "
                "compression.int4_algorithm k_quant cannot pack: use int4_algorithm rtn (GPTQ-"
                "rounded by int4_gptq) or a block size that halves the count"
            )


def _finish(
    b: _Build,
    config: ExportConfig,
    texts: list[str] | None,
    log: Log | None,
    prompts: list[str] | None = None,
) -> float:
    """What follows the builder for one variant: GPTQ, the LM head's trim, the logit mask, the
    tokenizer's decoder. Returns the seconds it took."""
    start = time.monotonic()
    if b.awq:
        shutil.copy(b.source / AWQ_FILE, b.folder / AWQ_FILE)
    if b.gptq:
        try:
            refine(b.source, b.folder, (texts or [])[: config.calibration_prompts], log)
        except (ValueError, RuntimeError) as e:  # the builder's rounding stays in use
            if log:
                log(f"gptq: skipped, the export keeps nearest rounding: {e}")
    if b.trim:
        _trim_head(b, texts or [], prompts or [], config.lm_head_tokens or 0, log)
    if b.suppressed:
        _mask_logits(b.folder, b.suppressed)
    _plain_bytelevel_decoder(b.folder)
    return time.monotonic() - start


def _trim_head(
    b: _Build, texts: list[str], prompts: list[str], frequent: int, log: Log | None
) -> None:
    from lifecycle_dagster.ml.lm_head import TRIM_FILE, kept_tokens, trim_lm_head, written_tokens
    from lifecycle_dagster.ml.models import load_tokenizer

    tokenizer = load_tokenizer(b.source)
    written = written_tokens(b.folder, tokenizer, prompts) if prompts else set()
    keep = kept_tokens(tokenizer, texts, frequent, written)
    result = trim_lm_head(b.folder, keep, SUPPRESSED_LOGIT)
    record = asdict(result) | {"frequent": frequent, "written": len(written)}
    (b.folder / TRIM_FILE).write_text(json.dumps(record))
    if log:
        log(
            f"lm_head: {b.name} keeps {result.kept} of {result.vocabulary} tokens "
            f"({len(texts)} train texts', the {len(written)} it writes after train prompts and "
            f"the first {frequent}); the head reads "
            f"{result.bytes_after / 1e6:.1f} MB a token instead of {result.bytes_before / 1e6:.1f}"
        )


def suppressed_tokens(model_dir: Path) -> list[int]:
    """The token ids the model's generation config never lets it generate."""
    path = Path(model_dir) / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    return sorted(config.get("suppress_tokens") or [])


def _mask_logits(folder: Path, token_ids: list[int]) -> None:
    """Rewrite the graph so that ``logits`` = the LM head's logits + a constant mask that puts the
    given tokens at ``SUPPRESSED_LOGIT`` (the weights, in external data, are not touched)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    path = Path(folder) / MODEL_FILE
    graph_model = onnx.load(str(path), load_external_data=False)
    graph = graph_model.graph
    output = next(o for o in graph.output if o.name == "logits")
    dims = output.type.tensor_type.shape.dim
    vocab = dims[-1].dim_value
    if not vocab or max(token_ids) >= vocab:
        raise ValueError(
            f"{path}: cannot mask tokens {token_ids[:4]}... in logits of width {vocab}"
        )
    dtype = helper.tensor_dtype_to_np_dtype(output.type.tensor_type.elem_type)
    mask = np.zeros(vocab, dtype=dtype)
    mask[token_ids] = SUPPRESSED_LOGIT
    producer = next(n for n in graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_unmasked"
    graph.initializer.append(numpy_helper.from_array(mask, "suppressed_tokens_mask"))
    graph.node.append(
        helper.make_node(
            "Add", ["logits_unmasked", "suppressed_tokens_mask"], ["logits"], "/suppress_tokens"
        )
    )
    onnx.save(graph_model, str(path))


def _builder_options(variant: str, config: ExportConfig) -> dict:
    if variant == "fp32":
        return {}
    options = {"block_size": config.block_size, "accuracy_level": config.accuracy_level}
    if variant == "int8":
        # Only MatMuls: the builder quantises an embedding Gather to 4 bits only.
        return options | {"op_types_to_quantize": "MatMul"}
    options |= {"op_types_to_quantize": "MatMul/Gather", "algo_config": config.int4_algorithm}
    kept = {
        "none": None,
        "lm_head": "last_matmul:int8",
        "lm_head_and_sensitive": "last_matmul:int8,mixed_layers:int8",
    }[config.int4_keep_int8]
    if kept:
        options["matmul_mixed_precision"] = kept
    return options


def _build_all(builds: list[_Build], log: Log | None) -> dict[str, float]:
    """The model builder for every build in one child process (``ml.onnx_builder``: its imports
    once; the memory of the models it held back when it ends). Returns seconds per variant."""
    from lifecycle_dagster.ml.onnx_builder import MARK

    seconds: dict[str, float] = {}
    if not builds:
        return seconds
    if log:
        log(
            "onnx: exporting "
            + "; ".join(f"{b.name} ({describe(b.name)})" for b in builds)
            + " with the model builder (KV cache)"
        )
    with tempfile.TemporaryDirectory(prefix="onnx-cache-") as cache:
        commands = []
        for b in builds:
            args = ["-m", str(b.source), "-o", str(b.folder), "-p", b.precision, "-e", "cpu"]
            args += ["-c", str(Path(cache) / b.name)]
            if b.options:
                args += ["--extra_options", *(f"{k}={v}" for k, v in b.options.items())]
            commands.append(args)
        spec = Path(cache) / "builds.json"
        spec.write_text(json.dumps(commands))
        cmd = [sys.executable, "-m", "lifecycle_dagster.ml.onnx_builder", str(spec)]
        env = {**os.environ, "TQDM_DISABLE": "1"}
        output: list[str] = []
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        ) as proc:
            for line in proc.stdout or ():
                output.append(line)
                if line.startswith(f"{MARK} imported ") and log:
                    log(f"onnx: model builder loaded in {float(line.split()[-1]):.1f} s")
                if line.startswith(f"{MARK} built "):
                    index, took = line.split()[-2:]
                    b = builds[int(index)]
                    seconds[b.name] = float(took)
                    if log:
                        log(f"onnx: built {b.name} in {float(took):.1f} s")
        failed = next((b for b in builds if b.name not in seconds), None)
    if proc.returncode != 0 or failed or any(not (b.folder / MODEL_FILE).exists() for b in builds):
        what = f"{failed.precision}, {failed.name}" if failed else "every variant"
        source = failed.source if failed else builds[0].source
        tail = "".join(output)[-4000:]
        raise RuntimeError(f"ONNX export ({what}) of {source} failed:\n{tail}")
    return seconds


def _quantize_dynamic(fp32: Path, folder: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder.mkdir(parents=True)
    quantize_dynamic(
        fp32 / MODEL_FILE,
        folder / MODEL_FILE,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        use_external_data_format=True,
    )
    for extra in fp32.iterdir():
        if not extra.name.startswith(MODEL_FILE):
            shutil.copy(extra, folder / extra.name)


def _plain_bytelevel_decoder(folder: Path) -> None:
    """onnxruntime-genai misreads mixed decoders (as converted from GGUF): keep plain ByteLevel."""
    path = folder / "tokenizer.json"
    if not path.exists():
        return
    tok = json.loads(path.read_text())
    pre = tok.get("pre_tokenizer") or {}
    uses_bytelevel = "ByteLevel" in json.dumps(pre)
    if uses_bytelevel and (tok.get("decoder") or {}).get("type") != "ByteLevel":
        tok["decoder"] = {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        }
        path.write_text(json.dumps(tok))
