"""Export to ONNX with KV cache, quantise, run in onnxruntime, and verify against PyTorch.

The export uses onnxruntime-genai's model builder (decoder-only transformers with a KV cache, fused
attention), once per variant: fp32, weight-only int8 and int4 (MatMulNBits), and optionally
onnxruntime's dynamic int8. ``OrtDecoder`` runs the artifact with plain
onnxruntime, feeding ``present.*`` back as ``past_key_values.*`` each step, so the check exercises the
cache exactly as serving does.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from lifecycle_dagster.ml.progress import Log
from lifecycle_dagster.ml.tunables import Tunables

MODEL_FILE = "model.onnx"
# Added to the logits of suppressed tokens in the graph: far below any real logit, finite in fp16.
SUPPRESSED_LOGIT = -1e4
# Decoding step by step with the KV cache must give what a full recomputation gives (both in
# onnxruntime): the same greedy token at every step, and logits within float noise (fp32) or within
# 5% of the logit range (quantised kernels take other paths for one row than for many). A cache that
# is ignored or misaligned predicts from the wrong context and fails both.
CACHE_ATOL = 5e-2
CACHE_RTOL = 0.05


def cache_matches(stepped, recomputed) -> bool:
    """Step-by-step logits (with the cache) against a full recomputation, row by row: close within
    tolerance, and each step's greedy token one the recomputation also ranks best (a near-tie,
    within the same tolerance, may go either way)."""
    import numpy as np

    spread = float(recomputed.max() - recomputed.min())
    tol = max(CACHE_ATOL, CACHE_RTOL * spread)
    if float(np.abs(stepped - recomputed).max()) > tol:
        return False
    chosen = stepped.argmax(-1)
    best = recomputed.max(-1)
    return bool((recomputed[np.arange(len(chosen)), chosen] >= best - tol).all())


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
    int4_mixed_precision: bool = Field(
        True, description="int4: keep the LM head and the most sensitive layers in int8."
    )

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
    model_dir: Path, out_dir: Path, config: ExportConfig, log: Log | None = None
) -> ExportResult:
    """Write one runnable onnxruntime-genai folder per variant under ``out_dir``."""
    out_dir = Path(out_dir)
    variants: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    suppressed = suppressed_tokens(model_dir)
    for name in config.variants:
        start = time.monotonic()
        folder = out_dir / name
        if log:
            log(f"onnx: exporting {name} ({VARIANTS[name]}, KV cache)")
        if name == "int8_dynamic":
            _quantize_dynamic(out_dir / "fp32", folder)
        else:
            _build(model_dir, folder, name, _builder_options(name, config))
            if suppressed:
                _mask_logits(folder, suppressed)
        _plain_bytelevel_decoder(folder)
        variants[name] = folder
        seconds[name] = time.monotonic() - start
    return ExportResult(
        path=out_dir,
        variants=variants,
        sizes={name: onnx_bytes(path) for name, path in variants.items()},
        seconds=seconds,
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
    if config.int4_mixed_precision:
        options["matmul_mixed_precision"] = "last_matmul:int8,mixed_layers:int8"
    return options


def _build(model_dir: Path, folder: Path, precision: str, extra: dict) -> None:
    """onnxruntime-genai's model builder, in a subprocess (it holds the whole model in memory)."""
    with tempfile.TemporaryDirectory(prefix="onnx-cache-") as cache:
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-m",
            str(model_dir),
            "-o",
            str(folder),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            cache,
        ]
        if extra:
            cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
        env = {**os.environ, "TQDM_DISABLE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (folder / MODEL_FILE).exists():
        raise RuntimeError(
            f"ONNX export ({precision}) of {model_dir} failed:\n{proc.stderr[-4000:]}"
        )


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


class OrtDecoder:
    """Greedy decoding of an exported folder with onnxruntime, reusing the KV cache every step."""

    def __init__(self, folder: Path, threads: int = 1):
        import onnxruntime as ort

        cfg = json.loads((Path(folder) / "genai_config.json").read_text())["model"]
        dec = cfg["decoder"]
        self.layers = dec["num_hidden_layers"]
        self.kv_heads = dec["num_key_value_heads"]
        self.head_size = dec["head_size"]
        eos = cfg["eos_token_id"]
        self.eos = set(eos if isinstance(eos, list) else [eos])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(Path(folder) / MODEL_FILE), opts, providers=["CPUExecutionProvider"]
        )
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        if not any(n.startswith("past_key_values") for n in self.input_names):
            raise ValueError(f"{folder}: the exported model has no KV-cache inputs")

    def empty_past(self, batch: int = 1) -> dict:
        import numpy as np

        shape = (batch, self.kv_heads, 0, self.head_size)
        return {
            f"past_key_values.{i}.{kv}": np.zeros(shape, dtype=np.float32)
            for i in range(self.layers)
            for kv in ("key", "value")
        }

    def step(self, ids, past: dict, total: int):
        """One forward pass: ``ids`` is one sequence (a list) or a batch of equal-length sequences
        (a 2-D array, no padding); ``total`` is the length including the cache. Returns the logits
        and the cache to feed next."""
        import numpy as np

        batch = np.atleast_2d(np.asarray(ids, dtype=np.int64))
        feeds = {
            "input_ids": batch,
            "attention_mask": np.ones((batch.shape[0], total), dtype=np.int64),
            **past,
        }
        outs = self.session.run(None, feeds)
        result = dict(zip(self.output_names, outs, strict=True))
        present = {
            f"past_key_values.{i}.{kv}": result[f"present.{i}.{kv}"]
            for i in range(self.layers)
            for kv in ("key", "value")
        }
        return result["logits"], present

    def prefill_logits(self, ids: list[int]):
        logits, _ = self.step(ids, self.empty_past(), len(ids))
        return logits[0]

    def generate(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], list]:
        """Greedy tokens and the logits that chose each one."""
        logits, past = self.step(ids, self.empty_past(), len(ids))
        out, chosen_logits = [], []
        total = len(ids)
        for _ in range(max_new_tokens):
            last = logits[0, -1]
            token = int(last.argmax())
            chosen_logits.append(last)
            if token in self.eos:
                break
            out.append(token)
            total += 1
            logits, past = self.step([token], past, total)
        return out, chosen_logits


class GenaiGenerator:
    """Greedy generation with onnxruntime-genai: the decode loop in C++ over onnxruntime, the KV
    cache kept in buffers it reuses across steps. What serving and the quality checks run."""

    def __init__(self, folder: Path, threads: int = 1):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.overlay(
            json.dumps(
                {
                    "model": {
                        "decoder": {
                            "session_options": {
                                "intra_op_num_threads": threads,
                                "inter_op_num_threads": 1,
                            }
                        }
                    }
                }
            )
        )
        self.model = og.Model(config)
        cfg = json.loads((Path(folder) / "genai_config.json").read_text())["model"]
        eos = cfg["eos_token_id"]
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.context_length = int(cfg["context_length"])

    def start(self, batch, max_new_tokens: int, ignore_eos: bool = False):
        """A generator with ``batch`` (equal-length prompts) already prefilled."""
        import numpy as np

        ids = np.asarray(batch, dtype=np.int32)
        params = self.og.GeneratorParams(self.model)
        total = ids.shape[1] + max_new_tokens
        options = {"max_length": total, "do_sample": False, "batch_size": ids.shape[0]}
        if ignore_eos:
            options["min_length"] = total
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        return generator

    def generate(
        self, ids: list[int], max_new_tokens: int, ignore_eos: bool = False, keep: int = 0
    ) -> list[int]:
        """Greedy continuation of one prompt, without the EOS token. A prompt that would not fit
        the context with ``max_new_tokens`` is cut from the left (its end is what is continued),
        after its first ``keep`` tokens (a soft prompt), which stay."""
        room = self.context_length - max_new_tokens - keep
        if room <= 0:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} + {keep} kept >= context {self.context_length}"
            )
        ids = ids[:keep] + ids[keep:][-room:]
        generator = self.start([ids], max_new_tokens, ignore_eos)
        while not generator.is_done():
            generator.generate_next_token()
        out = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
        if not ignore_eos:
            for i, token in enumerate(out):
                if token in self.eos:
                    return out[:i]
        return out

    def decode_batch(self, batch: list[list[int]], max_new_tokens: int) -> float:
        """Seconds spent decoding ``max_new_tokens`` for each of a batch of equal-length prompts
        (the prefill excluded), EOS ignored: a throughput measurement."""
        generator = self.start(batch, max_new_tokens, ignore_eos=True)
        start = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
        return time.perf_counter() - start


@dataclass
class Faithfulness:
    variant: str
    max_abs_logit_diff: float
    token_agreement: float
    text_equal: float
    cache_consistent: bool
    ort_tokens_per_s: float
    torch_tokens_per_s: float
    examples: list[dict] = field(default_factory=list)


def verify_against_torch(
    model,
    tokenizer,
    decoder: OrtDecoder,
    prompts: list[str],
    *,
    max_new_tokens: int,
    variant: str,
    generator: GenaiGenerator | None = None,
) -> Faithfulness:
    """Compare prefill logits, greedy tokens and decoded text of ONNX and PyTorch, batch 1. The
    tokens come from ``generator`` (what serving runs) when given, else from ``decoder``.

    Also checks that decoding with the cache gives the logits a full recomputation gives: an export
    that silently ignores its cache fails here. Logits of suppressed tokens (masked in the graph)
    are left out of both comparisons.
    """
    import numpy as np
    import torch

    from lifecycle_dagster.ml.soft_prompt import soft_prompt_ids, with_soft_prompt

    suppressed = list(getattr(model.generation_config, "suppress_tokens", None) or [])
    keep = len(soft_prompt_ids(tokenizer))

    max_diff, agree, total_tok, equal = 0.0, 0, 0, 0
    ort_time = torch_time = 0.0
    ort_tokens = torch_tokens = 0
    cache_ok = True
    examples = []
    device = next(model.parameters()).device
    for prompt, model_prompt in zip(prompts, with_soft_prompt(tokenizer, prompts), strict=True):
        ids = tokenizer(model_prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref_logits = model(torch.tensor([ids], device=device)).logits[0].float().cpu().numpy()
        ort_logits = decoder.prefill_logits(ids)
        columns = np.ones(ort_logits.shape[-1], dtype=bool)
        columns[suppressed] = False
        max_diff = max(max_diff, float(np.abs(ref_logits - ort_logits)[:, columns].max()))

        t0 = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        torch_time += time.perf_counter() - t0
        ref_tokens = [t for t in gen[0, len(ids) :].tolist() if t != tokenizer.eos_token_id]
        torch_tokens += max(1, len(ref_tokens))
        t0 = time.perf_counter()
        if generator is not None:
            ort_tok = generator.generate(ids, max_new_tokens, keep=keep)
        else:
            ort_tok, _ = decoder.generate(ids, max_new_tokens)
        ort_time += time.perf_counter() - t0
        ort_tokens += max(1, len(ort_tok))

        n = max(len(ref_tokens), len(ort_tok))
        agree += sum(1 for a, b in zip(ref_tokens, ort_tok, strict=False) if a == b)
        total_tok += max(1, n)
        ref_text = tokenizer.decode(ref_tokens, skip_special_tokens=True)
        ort_text = tokenizer.decode(ort_tok, skip_special_tokens=True)
        equal += int(ref_text == ort_text)
        examples.append({"prompt_tail": prompt[-60:], "torch": ref_text, "onnx": ort_text})

        # The cache check stays inside one decoder: its own greedy steps, with the cache, against
        # one pass over the same tokens without it.
        dec_tok, step_logits = decoder.generate(ids, max_new_tokens)
        if dec_tok:
            full = decoder.prefill_logits(ids + dec_tok[:-1])
            k = min(len(step_logits), len(dec_tok))
            stepped = np.stack(step_logits[:k])[:, columns]
            recomputed = full[len(ids) - 1 : len(ids) - 1 + k][:, columns]
            if not cache_matches(stepped, recomputed):
                cache_ok = False
    return Faithfulness(
        variant=variant,
        max_abs_logit_diff=max_diff,
        token_agreement=agree / max(1, total_tok),
        text_equal=equal / max(1, len(prompts)),
        cache_consistent=cache_ok,
        ort_tokens_per_s=ort_tokens / max(ort_time, 1e-9),
        torch_tokens_per_s=torch_tokens / max(torch_time, 1e-9),
        examples=examples,
    )


def generate_texts(
    generator: GenaiGenerator,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    log: Log | None = None,
    stage: str = "onnx",
) -> tuple[list[str], float]:
    """Greedy completions from the ONNX artifact, one prompt at a time (after the model's soft
    prompt, when it has one); and decode tokens/s."""
    from lifecycle_dagster.ml.evaluate import clean_completion
    from lifecycle_dagster.ml.soft_prompt import soft_prompt_ids, with_soft_prompt

    keep = len(soft_prompt_ids(tokenizer))
    texts, tokens, seconds = [], 0, 0.0
    for i, prompt in enumerate(with_soft_prompt(tokenizer, prompts), 1):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        start = time.perf_counter()
        out = generator.generate(ids, max_new_tokens, keep=keep)
        seconds += time.perf_counter() - start
        tokens += max(1, len(out))
        texts.append(clean_completion(tokenizer.decode(out, skip_special_tokens=True)))
        if log and (i % 16 == 0 or i == len(prompts)):
            log(f"{stage}: {i}/{len(prompts)} generated")
    return texts, tokens / max(seconds, 1e-9)
