"""PyTorch eager fp32 against every ONNX variant (onnxruntime-genai, what serving runs) and
llama.cpp at the same bit widths, on the demo model, in one sitting.

    make bench                        # sets up llama.cpp in the bench environment first
    python bench/compression.py [--model DIR] [--examples 80] [--rounds 3] [--threads N]

The model is the one the newest ``onnx_model`` artifact was exported from, and the ONNX rows are
that artifact's own variants, the deployed one marked (``make demo`` makes one); without an
artifact, the newest aligned model exported here, else SmolLM2 from the demo GGUF file. For each
engine: prefill latency (a 128-token prompt and the use case's median prompt), decode tokens/s at
batch 1 and batch 8 (64 and 32 new tokens, EOS ignored), the time of one eval answer, peak
resident memory over the process's baseline, size on disk, weight bytes read per decoded token,
and quality on the eval split (ROUGE-L, greedy token agreement with PyTorch). It also measures
memory read bandwidth (a reduction over 1 GiB on the same threads) and gives each engine's batch-1
decode rate as a fraction of the bound that bandwidth sets.

Each engine runs in a process of its own (``--worker``): llama.cpp's OpenMP runtime never shares a
process with PyTorch's, and an engine that crashes is reported and left out while the others are
measured. Prefill and decode are measured in ``--rounds`` rounds (3), every engine once a round,
each figure the best of 3 runs within a round and the median over the rounds: a shared machine's
speed drifts by 15% and more between minutes, and a ratio from one pass can be its drift. Prints a markdown table (and writes it to bench/results/compression.md, the figures to
compression.json) with ratios from this run. llama.cpp (llama-cpp-python, built from source)
lives in the bench environment only: the ``$LIFECYCLE_HOME/bench/site`` folder that
``make bench-env`` fills; the project never imports it.
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
from lifecycle_dagster.ml.compress import SELECTED_FILE, quality_drop
from lifecycle_dagster.ml.data import PromptFormat, load_task_data, prompts_for, references
from lifecycle_dagster.ml.evaluate import clean_completion
from lifecycle_dagster.ml.export import VARIANTS, export_onnx, onnx_bytes
from lifecycle_dagster.ml.runtimes import GenaiGenerator
from lifecycle_dagster.ml.suite import paired_bootstrap
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
ANSWER_TOKENS = 32
REPEATS = 3  # each speed figure within a round: the best of this many
SPEED = ("prefill_ms", "prefill_uc_ms", "decode_b1", "decode_b8")  # measured again each round
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
    prefill_uc_ms: float = float("nan")  # the use case's median eval prompt
    answer_ms: float = float("nan")  # one eval answer, prompt to last token, batch 1
    decode_b1: float = float("nan")
    decode_b8: float = float("nan")
    peak_mb: float = float("nan")
    weight_mb_per_token: float = float("nan")
    rouge_l: float = float("nan")
    agreement: float = float("nan")
    deployed: bool = False
    # each speed figure in every round (SPEED keys), the row's figure being their median
    rounds: dict[str, list[float]] = field(default_factory=dict, repr=False)
    worker: dict = field(default_factory=dict, repr=False)  # what measured it: kind and path
    predictions: list[list[int]] = field(default_factory=list, repr=False)
    rouge_each: list[float] = field(default_factory=list, repr=False)  # per eval prompt
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


def import_llama_cpp():
    """llama-cpp-python from the bench environment, its logging silenced; None when absent."""
    global _QUIET
    sys.path.insert(0, str(SITE))
    try:
        import llama_cpp
    except ImportError:
        return None
    _QUIET = llama_cpp.llama_log_callback(_quiet)  # kept referenced: C holds the pointer
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    return llama_cpp


def newest(pattern: str) -> Path | None:
    found = sorted(settings.artifacts_root().glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def resolve_model(arg: str | None) -> tuple[Path, str, Path | None]:
    """The PyTorch model to compare against, what it is, and the ``onnx_model`` artifact exported
    from it (None: the bench exports the variants itself)."""
    if arg:
        return Path(arg), f"given: {arg}", None
    selected = newest("*/onnx_model/*/selected.json")
    if selected:
        artifact = selected.parent
        source = json.loads((artifact / "serving.json").read_text())["source_model"]
        source = Path(source) if Path(source).is_absolute() else settings.artifacts_root() / source
        if source.exists():
            return (
                source,
                f"aligned model {source.parent.name}, exported as {artifact.name}",
                artifact,
            )
    aligned = newest("*/aligned_model/*/model")
    if aligned:
        return aligned, f"aligned model {aligned.parent.name}", None
    from lifecycle_dagster.ml.models import convert_gguf

    uc = load_use_case(profile="demo")
    folder = convert_gguf(Path(uc.base_model.path), settings.state_home() / "cache" / "gguf")
    return folder, "SmolLM2-135M-Instruct (no aligned model yet: run `make demo` first)", None


def to_gguf(model_dir: Path, out: Path, names: list[str]) -> dict[str, Path]:
    """HF folder -> f32 GGUF with llama.cpp's converter -> each quantisation type (run in a
    process of its own: it loads llama.cpp)."""
    llama_cpp = import_llama_cpp()
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
    for name in names:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")
        params.nthread = os.cpu_count() or 1
        target = out / f"model-{name}.gguf"
        if llama_cpp.llama_model_quantize(
            str(f32).encode(), str(target).encode(), ctypes.byref(params)
        ):
            raise RuntimeError(f"llama.cpp quantisation to {name} failed")
        files[name] = target
    return files


def measure(engine, spec: dict, log) -> dict:
    """Prefill (fixed 128 tokens, and the use case's median prompt), batch-1 and batch-8 decode,
    each the best of ``REPEATS`` (the machine's noise only ever slows a run down), and the greedy
    answers to the eval prompts with the time each took."""
    fixed, batch, stop = spec["fixed"], spec["batch"], set(spec["stop"])
    prompts_ids = spec["prompts_ids"]
    median_prompt = sorted(prompts_ids, key=len)[len(prompts_ids) // 2]
    out: dict = {}
    engine.prefill(fixed[:8])  # warm-up

    def prefill_ms(ids):
        times = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            engine.prefill(ids)
            times.append(time.perf_counter() - t)
        return 1000 * min(times)

    def decode_b1():
        t = time.perf_counter()
        engine.prefill(fixed[:16])
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        tokens = engine.greedy(fixed[:16], DECODE_TOKENS, None)
        return len(tokens) / max(time.perf_counter() - t - prefill, 1e-9)

    out["prefill_ms"] = prefill_ms(fixed)
    out["prefill_uc_ms"] = prefill_ms(median_prompt)
    out["decode_b1"] = max(decode_b1() for _ in range(REPEATS))
    out["decode_b8"] = max(
        BATCH * BATCH_DECODE_TOKENS / engine.batch_decode(batch, BATCH_DECODE_TOKENS)
        for _ in range(REPEATS)
    )
    if spec.get("speed_only"):
        return out
    out["predictions"], seconds = [], []
    for i, ids in enumerate(prompts_ids, 1):
        t = time.perf_counter()
        out["predictions"].append(engine.greedy(ids, ANSWER_TOKENS, stop))
        seconds.append(time.perf_counter() - t)
        if i % 8 == 0:
            log(f"  {spec['engine']}: {i}/{len(prompts_ids)} eval prompts")
    out["answer_ms"] = 1000 * sum(seconds) / len(seconds)
    return out


def worker(spec_path: Path) -> None:
    """One engine in this process: load it, measure it, write the figures next to the spec."""
    spec = json.loads(spec_path.read_text())
    threads, kind, path = spec["threads"], spec["kind"], Path(spec["path"])

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if kind == "gguf":
        files = to_gguf(path, Path(spec["out"]), spec["quants"])
        spec_path.with_suffix(".out.json").write_text(
            json.dumps({k: str(v) for k, v in files.items()})
        )
        return
    base = reset_peak()
    if kind == "torch":
        import torch

        torch.set_num_threads(threads)
        engine = TorchEngine(path)
    elif kind == "ort":
        engine = OrtEngine(path, threads)
    else:
        import_llama_cpp()
        engine = LlamaCppEngine(path, threads)
    result = measure(engine, spec, log)
    result["peak_mb"] = peak_mb() - base
    spec_path.with_suffix(".out.json").write_text(json.dumps(result))


def run_worker(work: Path, name: str, spec: dict, log) -> dict | None:
    """``spec`` measured in a child process; None (and why, logged) when it fails or crashes."""
    path = work / f"{name}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(path)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    sys.stderr.write(proc.stderr)
    result = path.with_suffix(".out.json")
    if proc.returncode != 0 or not result.exists():
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        log(f"{spec.get('engine', name)}: failed ({why}); left out of the table")
        return None
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF folder to benchmark (default: the deployed model's)")
    parser.add_argument(
        "--examples", type=int, default=80, help="eval examples for quality (the demo scores 80)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--rounds", type=int, default=3, help="speed rounds, every engine once per round"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compression.md"))
    parser.add_argument("--with-dynamic", action="store_true", help="also export int8_dynamic")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(Path(args.worker))

    from lifecycle_dagster.ml.models import load_tokenizer

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    model_dir, label, artifact = resolve_model(args.model)
    log(f"model: {label} ({model_dir}); threads {args.threads}")
    uc = load_use_case(profile="demo")
    evals = load_task_data(uc)["eval"].rows[: args.examples]
    # Prompted as the lifecycle trained and serves it (its chat template, when it has one).
    fmt = PromptFormat.read(model_dir)
    prompts, refs = prompts_for(uc, evals, fmt=fmt), references(uc, evals)
    tok = load_tokenizer(model_dir)
    prompts_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    fixed = tok("\n\n".join(prompts), add_special_tokens=False)["input_ids"][:PREFILL_TOKENS]
    batch = [ids[:BATCH_PROMPT_TOKENS] for ids in prompts_ids[:BATCH]]
    assert all(len(b) == BATCH_PROMPT_TOKENS for b in batch), "eval prompts shorter than 64 tokens"
    common = {
        "threads": args.threads,
        "prompts_ids": prompts_ids,
        "fixed": fixed,
        "batch": batch,
        "stop": [tok.eos_token_id] if tok.eos_token_id is not None else [],
    }
    bandwidth = read_bandwidth_gbs(args.threads)
    log(f"memory read bandwidth ({args.threads} threads): {bandwidth:.1f} GB/s")
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=BENCH if BENCH.exists() else None))
    try:
        rows = measure_all(model_dir, artifact, uc, args, common, work, log)
        more_rounds(rows, common, work, args.rounds, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # GBs of exports and GGUF files
    ref = rows[0]
    for row in rows:
        row.texts = [
            clean_completion(tok.decode(p, skip_special_tokens=True)) for p in row.predictions
        ]
        row.rouge_each = rouge_scores(row.texts, refs, ("rouge_l",))["rouge_l"]
        row.rouge_l = sum(row.rouge_each) / len(row.rouge_each)
        same = total = 0
        for a, b in zip(ref.predictions, row.predictions, strict=True):
            same += sum(1 for x, y in zip(a, b, strict=False) if x == y)
            total += max(len(a), len(b), 1)
        row.agreement = same / total
    uc_tokens = sorted(len(p) for p in prompts_ids)[len(prompts_ids) // 2]
    report = render(rows, bandwidth, label, args, uc, uc_tokens)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    skip = ("predictions", "texts", "worker", "rouge_each")
    records = [{k: v for k, v in r.__dict__.items() if k not in skip} for r in rows]
    out.with_suffix(".json").write_text(json.dumps(records, indent=2))
    log(f"wrote {out}")


def measure_all(model_dir: Path, artifact: Path | None, uc, args, common, work, log) -> list[Row]:
    """PyTorch, every ONNX variant (the deployed artifact's, else exported here) and llama.cpp,
    each engine in a process of its own (two OpenMP runtimes, or a crash in one engine, never
    take the others down)."""
    rows: list[Row] = []

    def add(row: Row, kind: str, path: Path) -> None:
        figures = run_worker(
            work,
            f"engine{len(rows)}",
            {**common, "kind": kind, "path": str(path), "engine": row.engine},
            log,
        )
        if figures is None:
            return
        for key, value in figures.items():
            setattr(row, key, value)
        row.rounds = {k: [figures[k]] for k in SPEED}
        row.worker = {"kind": kind, "path": str(path), "engine": row.engine}
        rows.append(row)
        log(f"{row.engine}: {row.decode_b1:.1f} tok/s at batch 1, {row.decode_b8:.0f} at batch 8")

    torch_row = Row("PyTorch eager", "fp32", safetensors_mb(model_dir))
    torch_row.weight_mb_per_token = torch_row.size_mb
    add(torch_row, "torch", model_dir)
    if not rows:
        raise SystemExit("PyTorch, the reference, could not be measured")
    variants, deployed, described = onnx_variants(model_dir, artifact, uc, args, work, log)
    for name, folder in variants.items():
        row = Row(f"ONNX Runtime {name}", described.get(name, name), onnx_bytes(folder) / 1e6)
        row.weight_mb_per_token = onnx_weight_bytes(folder) / 1e6
        row.deployed = name == deployed
        add(row, "ort", folder)
    # Looked for, not imported: llama.cpp's OpenMP runtime stays out of this process.
    if (
        not (SITE / "llama_cpp" / "__init__.py").exists()
        or not (LLAMA_CPP / "convert_hf_to_gguf.py").exists()
    ):
        log("llama.cpp is not in the bench environment (make bench-env): left out")
        return rows
    spec = {
        "kind": "gguf",
        "path": str(model_dir),
        "out": str(work / "gguf"),
        "threads": args.threads,
        "quants": list(LLAMA_BITS),
    }
    spec_path = work / "gguf.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)])
    if proc.returncode != 0:
        log(f"llama.cpp: GGUF conversion failed (exit {proc.returncode}); left out")
        return rows
    for name, path in json.loads(spec_path.with_suffix(".out.json").read_text()).items():
        row = Row(f"llama.cpp {name.upper()}", LLAMA_BITS[name], Path(path).stat().st_size / 1e6)
        row.weight_mb_per_token = row.size_mb  # tied embedding: read whole as the LM head
        add(row, "llama", Path(path))
    return rows


def more_rounds(rows: list[Row], common, work, rounds: int, log) -> None:
    """The speed figures of every engine measured ``rounds - 1`` times more, engine after engine
    in each round, so that a slow spell of the machine falls on all of them; each figure is then
    the median of its rounds."""
    for n in range(2, rounds + 1):
        log(f"speed round {n}/{rounds}")
        for i, row in enumerate(rows):
            spec = {**common, **row.worker, "speed_only": True}
            figures = run_worker(work, f"round{n}-engine{i}", spec, log)
            for key in SPEED if figures else ():
                row.rounds[key].append(figures[key])
    for row in rows:
        for key, values in row.rounds.items():
            setattr(row, key, median(values))


def onnx_variants(
    model_dir, artifact, uc, args, work, log
) -> tuple[dict[str, Path], str | None, dict[str, str]]:
    """The ONNX folders to measure, the deployed one's name and each one's description: the
    deployed artifact's own variants when there is one, else a fresh export with the use case's
    compression settings."""
    if artifact is not None:
        selected = json.loads((artifact / SELECTED_FILE).read_text())
        folders = {n: artifact / n for n in selected["variants"] if (artifact / n).is_dir()}
        return folders, selected["variant"], selected.get("descriptions", {})
    variants = list(uc.compression.variants) + (["int8_dynamic"] if args.with_dynamic else [])
    config = uc.compression.updated({"variants": variants})
    exported = export_onnx(model_dir, work / "onnx", config, log=log)
    return exported.variants, None, {n: VARIANTS[n] for n in exported.variants}


def safetensors_mb(model_dir: Path) -> float:
    """Size of the PyTorch weights, also what a decode step reads (a tied embedding is stored,
    and read as the LM head, once)."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 1e6


def render(rows: list[Row], bandwidth: float, label: str, args, uc, uc_tokens: int) -> str:
    ref = rows[0]
    budget = uc.compression
    head = (
        "| engine | weights | size MB | weights read/token MB | prefill 128 tok ms | "
        f"prefill {uc_tokens} tok ms | decode tok/s b1 | vs PyTorch | decode tok/s b8 | "
        "answer ms | peak MB | of bound | ROUGE-L | Δ ROUGE-L | token agreement |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        bound = bandwidth * 1e3 / r.weight_mb_per_token
        name = f"**{r.engine} (deployed)**" if r.deployed else r.engine
        lines.append(
            f"| {name} | {r.bits} | {r.size_mb:.0f} | {r.weight_mb_per_token:.0f} | "
            f"{r.prefill_ms:.0f} | {r.prefill_uc_ms:.0f} | {r.decode_b1:.1f} | "
            f"{r.decode_b1 / ref.decode_b1:.1f}x | {r.decode_b8:.0f} | {r.answer_ms:.0f} | "
            f"{r.peak_mb:.0f} | {r.decode_b1 / bound:.0%} | {r.rouge_l:.4f} | "
            f"{100 * (r.rouge_l - ref.rouge_l):+.2f} pts | {r.agreement:.1%} |"
        )

    def within(r: Row) -> bool:
        return quality_drop({"rouge_l": ref.rouge_l}, "rouge_l", r.rouge_l, None, budget)[2]

    deployed = next((r for r in rows if r.deployed), None)
    if deployed is None:  # no artifact: the smallest ONNX variant within the budget
        fit = [r for r in rows if r.engine.startswith("ONNX") and within(r)]
        deployed = min(fit, key=lambda r: r.size_mb) if fit else None
    notes = [
        "",
        f"Model: {label}. Each engine in a process of its own, {args.threads} threads each; "
        f"prefill and decode are the best of {REPEATS} runs in a round, the median of {args.rounds} "
        "rounds, every engine once a round. "
        f"Quality: {len(ref.predictions)} eval prompts (median {uc_tokens} tokens), greedy, up to "
        f"{ANSWER_TOKENS} new tokens; answer ms is the mean time of one. Decode: "
        f"{DECODE_TOKENS} new tokens after a 16-token prompt (b1), {BATCH_DECODE_TOKENS} after "
        f"{BATCH_PROMPT_TOKENS}-token prompts (b{BATCH}), EOS ignored. Memory read bandwidth "
        f"{bandwidth:.1f} GB/s (a {args.threads}-thread reduction over 1 GiB); of bound = batch-1 "
        "decode over bandwidth / weight bytes read per token.",
    ]
    if deployed is None:
        notes.append("No ONNX variant is within the quality budget.")
        return "\n".join(lines + notes)
    notes.append(
        f"Deployed: **{deployed.engine}** ({deployed.bits}): decode "
        f"{deployed.decode_b1 / ref.decode_b1:.1f}x PyTorch, {ref.size_mb / deployed.size_mb:.1f}x "
        f"smaller, ROUGE-L {100 * (deployed.rouge_l - ref.rouge_l):+.2f} pts "
        f"(budget -{100 * budget.max_metric_drop:g})."
    )

    def per_round(key: str, lc: Row) -> str:
        pairs = zip(deployed.rounds[key], lc.rounds[key], strict=False)
        return ", ".join(f"{a / b:.2f}x" for a, b in pairs)

    for lc in (r for r in rows if r.engine.startswith("llama.cpp")):
        paired = paired_bootstrap(
            dict(enumerate(deployed.rouge_each)), dict(enumerate(lc.rouge_each)), "rouge_l"
        )
        notes.append(
            f"Against {lc.engine}: {deployed.decode_b1 / lc.decode_b1:.2f}x its batch-1 decode, "
            f"{deployed.decode_b8 / lc.decode_b8:.2f}x its batch-8 decode, "
            f"{lc.prefill_uc_ms / deployed.prefill_uc_ms:.2f}x its prefill speed at "
            f"{uc_tokens} tokens, {deployed.weight_mb_per_token / lc.weight_mb_per_token:.2f}x "
            f"its weight bytes per token; ROUGE-L {100 * (deployed.rouge_l - lc.rouge_l):+.2f} "
            f"pts against it (95% interval {100 * paired.low:+.2f} to {100 * paired.high:+.2f}; "
            f"{lc.engine} is {'within' if within(lc) else 'outside'} the budget). Round by round: "
            f"batch 1 {per_round('decode_b1', lc)}; batch 8 {per_round('decode_b8', lc)}."
        )
    return "\n".join(lines + notes)


if __name__ == "__main__":
    main()
