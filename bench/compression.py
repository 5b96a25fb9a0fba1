"""PyTorch eager fp32 against the ONNX variants (onnxruntime) and llama.cpp at the same bit widths,
on the demo model, in one process and one sitting.

    make bench                        # sets up llama.cpp in the bench environment first
    python bench/compression.py [--model DIR] [--examples 32] [--threads N]

The model is the newest aligned model in the state dir (``make demo`` makes one), else SmolLM2 from
the demo GGUF file. For each engine: prefill latency (128-token prompt), decode tokens/s at batch 1
and batch 8 (64 and 32 new tokens, EOS ignored), peak resident memory over the process's baseline,
size on disk, and quality on the eval split (ROUGE-L, greedy token agreement with PyTorch). It also
measures memory read bandwidth (a reduction over 1 GiB on the same threads) and gives each engine's
batch-1 decode rate as a fraction of the bound that bandwidth sets: bandwidth / weight bytes read per
token.

Prints a markdown table (and writes it to bench/results/compression.md) with ratios from this run.
llama.cpp (llama-cpp-python, built from source) lives in the bench environment only: the
``$LIFECYCLE_HOME/bench/site`` folder that ``make bench-env`` fills; the project never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from lifecycle_dagster import settings
from lifecycle_dagster.ml.compress import quality_drop
from lifecycle_dagster.ml.data import load_task_data, prompts_for, references
from lifecycle_dagster.ml.evaluate import clean_completion
from lifecycle_dagster.ml.export import export_onnx
from lifecycle_dagster.ml.runtimes import GenaiGenerator
from lifecycle_dagster.ml.tasks.summarisation import rouge_scores
from lifecycle_dagster.ml.usecase_loader import load_use_case

BENCH = settings.state_home() / "bench"
SITE = BENCH / "site"
LLAMA_CPP = BENCH / "llama.cpp"
PREFILL_TOKENS = 128
DECODE_TOKENS = 64
BATCH = 8
BATCH_PROMPT_TOKENS = 64
BATCH_DECODE_TOKENS = 32
LLAMA_BITS = {
    "q8_0": "int8 (block 32)",
    "q4_0": "int4 (block 32)",
    "q4_k_m": "int4 (k-quant, mixed)",
}


# --- measurement helpers ------------------------------------------------------------------------


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> float:
    """Reset the kernel's peak-RSS mark (Linux clear_refs 5); returns the current RSS in MB."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # give freed heap back to the OS first
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return rss_mb()


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def read_bandwidth_gbs(threads: int, megabytes: int = 1024) -> float:
    """Bytes per second streamed from memory by a reduction over a buffer far larger than the
    caches, on ``threads`` threads (best of 5): what decoding reads its weights at, at best."""
    import torch

    buf = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(previous)
    return buf.numel() * 4 / best / 1e9


def onnx_weight_bytes(folder: Path) -> int:
    """Bytes of the initializers the MatMul-type nodes read each decode step (the LM head included;
    a plain embedding Gather reads one row per token and is left out)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    sizes = {}
    for init in model.graph.initializer:
        if uses_external_data(init):
            info = {e.key: e.value for e in init.external_data}
            sizes[init.name] = int(info.get("length", 0))
        else:
            sizes[init.name] = len(init.raw_data)
    read = set()
    for node in model.graph.node:
        if node.op_type in ("MatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul"):
            read.update(n for n in node.input if n in sizes)
    return sum(sizes[n] for n in read)


@dataclass
class Row:
    engine: str
    bits: str
    size_mb: float
    prefill_ms: float = float("nan")
    decode_b1: float = float("nan")
    decode_b8: float = float("nan")
    peak_mb: float = float("nan")
    weight_mb_per_token: float = float("nan")
    rouge_l: float = float("nan")
    agreement: float = float("nan")
    predictions: list[list[int]] = field(default_factory=list, repr=False)
    texts: list[str] = field(default_factory=list, repr=False)


# --- engines: each gives prefill(ids) -> logits-time, decode(ids, n) and batch decode -------------


class TorchEngine:
    def __init__(self, model_dir: Path):
        import torch

        from lifecycle_dagster.ml.models import load_causal_lm
        from lifecycle_dagster.ml.runtime import select_runtime

        self.torch = torch
        self.model = load_causal_lm(model_dir, select_runtime("cpu"))

    def prefill(self, ids: list[int]) -> None:
        with self.torch.no_grad():
            self.model(self.torch.tensor([ids]))

    def greedy(self, ids: list[int], n: int, stop: set[int] | None) -> list[int]:
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.tensor([ids]), use_cache=True)
            past, tokens = out.past_key_values, []
            for _ in range(n):
                token = int(out.logits[0, -1].argmax())
                if stop and token in stop:
                    break
                tokens.append(token)
                out = self.model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
        return tokens

    def batch_decode(self, batch: list[list[int]], n: int) -> float:
        """Seconds spent decoding ``n`` tokens for every row (after the prefill)."""
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.tensor(batch), use_cache=True)
            past = out.past_key_values
            start = time.perf_counter()
            for _ in range(n):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = self.model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
        return time.perf_counter() - start


class OrtEngine:
    """onnxruntime-genai over the exported folder: what serving runs."""

    def __init__(self, folder: Path, threads: int):
        self.gen = GenaiGenerator(folder, threads)

    def prefill(self, ids: list[int]) -> None:
        self.gen.start([ids], 1)

    def greedy(self, ids: list[int], n: int, stop: set[int] | None) -> list[int]:
        return self.gen.generate(ids, n, ignore_eos=not stop)

    def batch_decode(self, batch: list[list[int]], n: int) -> float:
        return self.gen.decode_batch(batch, n)


class LlamaCppEngine:
    def __init__(self, gguf: Path, threads: int):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=4096,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.threads = threads
        self.n_vocab = self.llm.n_vocab()

    def _logits(self, row: int = -1, ctx=None):
        import numpy as np

        ptr = self.lib.llama_get_logits_ith(ctx or self.llm.ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def greedy(self, ids: list[int], n: int, stop: set[int] | None) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        tokens = []
        for _ in range(n):
            token = int(self._logits().argmax())
            if stop and token in stop:
                break
            tokens.append(token)
            self.llm.eval([token])
        return tokens

    def batch_decode(self, batch: list[list[int]], n: int) -> float:
        """``len(batch)`` sequences decoded together (one llama_batch per step, a seq id each)."""
        lib = self.lib
        rows = len(batch)
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = 1024, 1024, 1024
        params.n_seq_max, params.kv_unified = rows, True
        params.n_threads = params.n_threads_batch = self.threads
        ctx = lib.llama_init_from_model(self.llm.model, params)
        cap = max(rows * len(batch[0]), rows)
        b = lib.llama_batch_init(cap, 0, rows)
        try:

            def submit(entries):  # (token, pos, seq, want_logits)
                b.n_tokens = len(entries)
                for i, (tok, pos, seq, want) in enumerate(entries):
                    b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
                    b.seq_id[i][0], b.logits[i] = seq, want
                if lib.llama_decode(ctx, b) != 0:
                    raise RuntimeError("llama_decode failed")

            length = len(batch[0])
            submit(
                [
                    (tok, p, s, p == length - 1)
                    for s, ids in enumerate(batch)
                    for p, tok in enumerate(ids)
                ]
            )
            last_rows = [(s + 1) * length - 1 for s in range(rows)]
            start = time.perf_counter()
            for step in range(n):
                nxt = [int(self._logits(r, ctx).argmax()) for r in last_rows]
                submit([(tok, length + step, s, True) for s, tok in enumerate(nxt)])
                last_rows = list(range(rows))
            return time.perf_counter() - start
        finally:
            lib.llama_batch_free(b)
            lib.llama_free(ctx)


# --- the benchmark ------------------------------------------------------------------------------


def _quiet(_level, _text, _user_data) -> None:
    """llama.cpp log callback: the quantiser prints a line per tensor."""


_QUIET = None


def resolve_model(arg: str | None) -> tuple[Path, str]:
    if arg:
        return Path(arg), f"given: {arg}"
    aligned = sorted(
        (p for p in settings.artifacts_root().glob("*/aligned_model/*/model")),
        key=lambda p: p.stat().st_mtime,
    )
    if aligned:
        return aligned[-1], f"aligned model {aligned[-1].parent.name}"
    from lifecycle_dagster.ml.models import convert_gguf

    uc = load_use_case(profile="demo")
    folder = convert_gguf(Path(uc.base_model.path), settings.state_home() / "cache" / "gguf")
    return folder, "SmolLM2-135M-Instruct (no aligned model yet: run `make demo` first)"


def to_gguf(model_dir: Path, out: Path, quants: dict[str, int]) -> dict[str, Path]:
    """HF folder -> f32 GGUF with llama.cpp's converter -> each quantisation type."""
    import llama_cpp

    out.mkdir(parents=True, exist_ok=True)
    f32 = out / "model-f32.gguf"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SITE), str(LLAMA_CPP / "gguf-py"), str(LLAMA_CPP)]),
    }
    proc = subprocess.run(
        [sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(model_dir),
         "--outtype", "f32", "--outfile", str(f32)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"GGUF conversion failed:\n{proc.stderr[-3000:]}")
    files = {}
    for name, ftype in quants.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = os.cpu_count() or 1
        target = out / f"model-{name}.gguf"
        if llama_cpp.llama_model_quantize(
            str(f32).encode(), str(target).encode(), ctypes.byref(params)
        ):
            raise RuntimeError(f"llama.cpp quantisation to {name} failed")
        files[name] = target
    return files


def measure(engine, row: Row, prompts_ids, fixed, batch, stop, log) -> Row:
    engine.prefill(fixed[:8])  # warm-up
    times = []
    for _ in range(3):
        t = time.perf_counter()
        engine.prefill(fixed)
        times.append(time.perf_counter() - t)
    row.prefill_ms = 1000 * median(times)
    t = time.perf_counter()
    engine.prefill(fixed[:16])
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    out = engine.greedy(fixed[:16], DECODE_TOKENS, None)
    row.decode_b1 = len(out) / max(time.perf_counter() - t - prefill, 1e-9)
    row.decode_b8 = BATCH * BATCH_DECODE_TOKENS / engine.batch_decode(batch, BATCH_DECODE_TOKENS)
    for i, ids in enumerate(prompts_ids, 1):
        row.predictions.append(engine.greedy(ids, 32, stop))
        if i % 8 == 0:
            log(f"  {row.engine}: {i}/{len(prompts_ids)} eval prompts")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF folder to benchmark (default: newest aligned model)")
    parser.add_argument("--examples", type=int, default=32, help="eval examples for quality")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compression.md"))
    parser.add_argument("--with-dynamic", action="store_true", help="also int8_dynamic")
    args = parser.parse_args()

    import torch

    from lifecycle_dagster.ml.models import load_tokenizer

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(SITE))
    global _QUIET
    try:
        import llama_cpp

        _QUIET = llama_cpp.llama_log_callback(_quiet)  # kept referenced: C holds the pointer
        llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
        have_llama = (LLAMA_CPP / "convert_hf_to_gguf.py").exists()
    except ImportError:
        have_llama = False

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    model_dir, label = resolve_model(args.model)
    log(f"model: {label} ({model_dir}); threads {args.threads}")
    uc = load_use_case(profile="demo")
    evals = load_task_data(uc)["eval"].rows[: args.examples]
    prompts, refs = prompts_for(uc, evals), references(uc, evals)
    tok = load_tokenizer(model_dir)
    stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    prompts_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    long_text = "\n\n".join(prompts)
    fixed = tok(long_text, add_special_tokens=False)["input_ids"][:PREFILL_TOKENS]
    batch = [ids[:BATCH_PROMPT_TOKENS] for ids in prompts_ids[:BATCH]]
    assert all(len(b) == BATCH_PROMPT_TOKENS for b in batch), "eval prompts shorter than 64 tokens"

    bandwidth = read_bandwidth_gbs(args.threads)
    log(f"memory read bandwidth ({args.threads} threads): {bandwidth:.1f} GB/s")
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=BENCH if BENCH.exists() else None))

    # PyTorch eager fp32: the reference for speed and quality.
    base = reset_peak()
    engine = TorchEngine(model_dir)
    params = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    row = Row(
        "PyTorch eager",
        "fp32",
        sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e6,
    )
    row.weight_mb_per_token = params / 1e6  # tied embedding: the LM head reads the whole table
    rows.append(measure(engine, row, prompts_ids, fixed, batch, stop, log))
    row.peak_mb = peak_mb() - base
    del engine
    log(f"PyTorch: {row.decode_b1:.1f} tok/s")

    variants = ("fp32", "int8", "int4") + (("int8_dynamic",) if args.with_dynamic else ())
    c = uc.compression
    config = c.updated({"variants": list(variants)})
    exported = export_onnx(model_dir, work / "onnx", config, log=log)
    mixed = ", int8 head + sensitive layers" if c.int4_mixed_precision else ""
    bits = {
        "fp32": "fp32",
        "int8": f"int8 (block {c.block_size})",
        "int4": f"int4 ({c.int4_algorithm}, block {c.block_size}{mixed})",
        "int8_dynamic": "int8 (w8a8 dynamic)",
    }
    for name, folder in exported.variants.items():
        base = reset_peak()
        engine = OrtEngine(folder, args.threads)
        row = Row(f"ONNX Runtime {name}", bits[name], exported.sizes[name] / 1e6)
        row.weight_mb_per_token = onnx_weight_bytes(folder) / 1e6
        rows.append(measure(engine, row, prompts_ids, fixed, batch, stop, log))
        row.peak_mb = peak_mb() - base
        del engine
        log(f"{row.engine}: {row.decode_b1:.1f} tok/s")

    if have_llama:
        import llama_cpp

        ggufs = to_gguf(
            model_dir,
            work / "gguf",
            {
                "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
                "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
                "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
            },
        )
        for name, path in ggufs.items():
            base = reset_peak()
            engine = LlamaCppEngine(path, args.threads)
            row = Row(
                f"llama.cpp {name.upper()}",
                LLAMA_BITS[name],
                path.stat().st_size / 1e6,
            )
            row.weight_mb_per_token = row.size_mb  # tied embedding: read whole as the LM head
            rows.append(measure(engine, row, prompts_ids, fixed, batch, stop, log))
            row.peak_mb = peak_mb() - base
            del engine
            log(f"{row.engine}: {row.decode_b1:.1f} tok/s")

    ref = rows[0]
    for row in rows:
        row.texts = [
            clean_completion(tok.decode(p, skip_special_tokens=True)) for p in row.predictions
        ]
        scores = rouge_scores(row.texts, refs, ("rouge_l",))["rouge_l"]
        row.rouge_l = sum(scores) / len(scores)
        same = total = 0
        for a, b in zip(ref.predictions, row.predictions, strict=True):
            same += sum(1 for x, y in zip(a, b, strict=False) if x == y)
            total += max(len(a), len(b), 1)
        row.agreement = same / total

    report = render(rows, bandwidth, label, args, uc)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    (out.with_suffix(".json")).write_text(
        json.dumps(
            [
                {k: v for k, v in r.__dict__.items() if k not in ("predictions", "texts")}
                for r in rows
            ],
            indent=2,
        )
    )
    shutil.rmtree(work, ignore_errors=True)  # GBs of exports and GGUF files
    log(f"wrote {out}")


def render(rows: list[Row], bandwidth: float, label: str, args, uc) -> str:
    ref = rows[0]
    budget = uc.compression
    head = (
        "| engine | weights | size MB | size vs fp32 | prefill 128 tok ms | decode tok/s b1 | "
        "vs PyTorch | decode tok/s b8 | peak MB | weights read/token MB | bound tok/s | "
        "of bound | ROUGE-L | Δ ROUGE-L | token agreement |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        bound = bandwidth * 1e3 / r.weight_mb_per_token
        lines.append(
            f"| {r.engine} | {r.bits} | {r.size_mb:.0f} | {ref.size_mb / r.size_mb:.1f}x | "
            f"{r.prefill_ms:.0f} | {r.decode_b1:.1f} | {r.decode_b1 / ref.decode_b1:.1f}x | "
            f"{r.decode_b8:.0f} | {r.peak_mb:.0f} | {r.weight_mb_per_token:.0f} | {bound:.0f} | "
            f"{r.decode_b1 / bound:.0%} | {r.rouge_l:.4f} | {100 * (r.rouge_l - ref.rouge_l):+.2f} pts | "
            f"{r.agreement:.1%} |"
        )
    # The variant the demo's policy would deploy: the smallest ONNX one within the ROUGE-L budget.
    onnx = [r for r in rows if r.engine.startswith("ONNX")]
    fit = [
        r for r in onnx
        if quality_drop({"rouge_l": ref.rouge_l}, "rouge_l", r.rouge_l, None, budget)[2]
    ]  # fmt: skip
    chosen = min(fit, key=lambda r: r.size_mb) if fit else None
    notes = [
        "",
        f"Model: {label}. {len(rows[0].predictions)} eval prompts, greedy, up to 32 new tokens. "
        f"{args.threads} threads for every engine. Memory read bandwidth {bandwidth:.1f} GB/s "
        f"(a {args.threads}-thread reduction over 1 GiB); bound = bandwidth / weight bytes read "
        "per token. Decode: 64 new tokens after a 16-token prompt (b1), 32 after 64-token prompts "
        "(b8), EOS ignored. Prefill: a 128-token prompt.",
    ]
    if chosen:
        target = [
            f"decode {chosen.decode_b1 / ref.decode_b1:.1f}x PyTorch (target 3x)",
            f"{ref.size_mb / chosen.size_mb:.1f}x smaller (target 4x)",
            f"ROUGE-L {100 * (chosen.rouge_l - ref.rouge_l):+.2f} pts "
            f"(budget -{100 * budget.max_metric_drop:g})",
        ]
        notes.append(
            f"Policy `smallest` within budget picks **{chosen.engine}**: " + "; ".join(target) + "."
        )
        width = chosen.bits.split()[0]
        for lc in (r for r in rows if r.engine.startswith("llama.cpp")):
            if lc.bits.split()[0] != width:
                continue
            lc_ok = quality_drop({"rouge_l": ref.rouge_l}, "rouge_l", lc.rouge_l, None, budget)[2]
            notes.append(
                f"Against {lc.engine} ({lc.bits}): {chosen.decode_b1 / lc.decode_b1:.2f}x its "
                f"batch-1 decode, {chosen.decode_b8 / lc.decode_b8:.2f}x its batch-8 decode, "
                f"{lc.prefill_ms / chosen.prefill_ms:.2f}x its prefill speed, "
                f"{chosen.size_mb / lc.size_mb:.2f}x its size; it is "
                f"{'within' if lc_ok else 'outside'} the quality budget "
                f"({100 * (lc.rouge_l - ref.rouge_l):+.2f} pts)."
            )
    return "\n".join(lines + notes)


if __name__ == "__main__":
    main()
