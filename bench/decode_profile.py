"""Where a decode step's time goes: onnxruntime's own profiler over batch-1 decode steps of an
exported variant, summed by operator type and by part of the model.

    python bench/decode_profile.py [FOLDER ...] [--steps 64] [--threads N]

FOLDER is an exported variant (default: every variant of the newest ``onnx_model`` artifact).
Each variant decodes ``--steps`` tokens after a 16-token prompt, one step per session run with
the KV cache fed back (as serving does); the profiler's kernel times are summed per operator
type and per part (attention, MLP, LM head, norms, the rest), and the wall time of a step is set
beside the sum of its kernels (the difference is the per-run overhead: feeding inputs, allocating
outputs). Prints a markdown table per variant and writes bench/results/decode_profile.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from lifecycle_dagster import settings
from lifecycle_dagster.ml.export import MODEL_FILE, onnx_bytes

PARTS = (
    ("LM head", ("lm_head",)),
    ("attention", ("attn", "rotary", "GroupQueryAttention")),
    ("MLP", ("mlp",)),
    ("norms", ("layernorm", "norm")),
    ("embedding", ("embed",)),
)


def part_of(node: str, op: str) -> str:
    name = node.lower()
    for part, keys in PARTS:
        if any(k.lower() in name or k == op for k in keys):
            return part
    return "other"


def profile(folder: Path, steps: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    layers, kv_heads, head = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_size"]
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(folder / MODEL_FILE), opts)
        names = [o.name for o in session.get_outputs()]
        past = {
            f"past_key_values.{i}.{kv}": np.zeros((1, kv_heads, 0, head), np.float32)
            for i in range(layers)
            for kv in ("key", "value")
        }

        def run(ids, past, total):
            feeds = {
                "input_ids": np.asarray([ids], np.int64),
                "attention_mask": np.ones((1, total), np.int64),
                **past,
            }
            out = dict(zip(names, session.run(None, feeds), strict=True))
            nxt = {
                f"past_key_values.{i}.{kv}": out[f"present.{i}.{kv}"]
                for i in range(layers)
                for kv in ("key", "value")
            }
            return int(out["logits"][0, -1].argmax()), nxt

        prompt = list(range(100, 116))
        token, cache = run(prompt, past, len(prompt))
        for step in range(8):  # warm-up, unprofiled
            token, cache = run([token], cache, len(prompt) + step + 1)
        # A second session, profiled, decodes from the same point.
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "decode")
        session = ort.InferenceSession(str(folder / MODEL_FILE), opts)
        token, cache = run(prompt, past, len(prompt))
        total = len(prompt)
        start = time.perf_counter()
        for _ in range(steps):
            total += 1
            token, cache = run([token], cache, total)
        wall = (time.perf_counter() - start) / steps
        trace = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    by_part: dict[str, float] = defaultdict(float)
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    kernels = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    decode_runs = runs[1:]  # the first profiled run is the prefill
    first = decode_runs[0]["ts"] if decode_runs else 0
    for e in kernels:
        if e["ts"] < first:
            continue
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] += e["dur"] / 1000 / steps
        by_part[part_of(e["name"], op)] += e["dur"] / 1000 / steps
    return {
        "variant": folder.name,
        "MB": onnx_bytes(folder) / 1e6,
        "wall_ms": 1000 * wall,
        "kernels_ms": sum(by_op.values()),
        "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "by_part": dict(sorted(by_part.items(), key=lambda kv: -kv[1])),
    }


def render(results: list[dict], threads: int, steps: int) -> str:
    lines = [
        f"Batch-1 decode, {steps} steps after a 16-token prompt, {threads} threads; ms per step "
        "(kernel times from onnxruntime's profiler; overhead = wall - kernels).",
        "",
        "| variant | MB | wall ms/token | kernels ms | overhead ms | LM head | attention | MLP | "
        "norms | other | top operators |",
        "|" + "---|" * 11,
    ]
    for r in results:
        p = r["by_part"]
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(r["by_op"].items())[:4])
        lines.append(
            f"| {r['variant']} | {r['MB']:.0f} | {r['wall_ms']:.2f} | {r['kernels_ms']:.2f} | "
            f"{r['wall_ms'] - r['kernels_ms']:.2f} | {p.get('LM head', 0):.2f} | "
            f"{p.get('attention', 0):.2f} | {p.get('MLP', 0):.2f} | {p.get('norms', 0):.2f} | "
            f"{p.get('other', 0) + p.get('embedding', 0):.2f} | {top} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "folders", nargs="*", help="exported variants (default: the newest artifact's)"
    )
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "decode_profile.md")
    )
    args = parser.parse_args()
    folders = [Path(f) for f in args.folders]
    if not folders:
        found = sorted(
            settings.artifacts_root().glob("*/onnx_model/*/selected.json"),
            key=lambda p: p.stat().st_mtime,
        )
        if not found:
            sys.exit("no onnx_model artifact: run `make demo` first, or name exported folders")
        folders = sorted(p.parent for p in found[-1].parent.glob("*/genai_config.json"))
    results = []
    for folder in folders:
        results.append(profile(folder, args.steps, args.threads))
        r = results[-1]
        print(f"{folder.name}: {r['wall_ms']:.2f} ms/token", file=sys.stderr, flush=True)
    report = render(results, args.threads, args.steps)
    print(report)
    Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
