"""The model server under load, from one sitting: `lifecycle serve` on 127.0.0.1 with the use
case's champion, driven by the `openai` client as applications drive it.

    python bench/serving.py [--profile demo] [--model NAME] [--levels 1,4,16] [--per-client 4]

For 1, 4 and 16 concurrent clients (each sends ``--per-client`` streamed chat requests, one after
another, over the use case's eval inputs), once with one request decoded at a time
(``--max-batch 1``) and once with batching (``--max-batch 16``): requests/s, generated tokens/s,
p50/p95 latency, p50 time to first token, errors. Then past the queue (``--max-queue 4``, 32
clients at once): how many got 429 and how many failed otherwise (5xx: none expected). Writes
``bench/results/serving.md`` and ``.json``; prints the table and the batching ratio. Traffic goes to
loopback only, each request bounded by a timeout, the whole run by the request counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

RESULTS = Path(__file__).resolve().parent / "results"
CLI = Path(sys.executable).parent / "lifecycle"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(CLI), "serve", "--port", str(self.port), "--threads", str(args.threads)]
        cmd += ["--no-tracing", "--follow-s", "0", *options]
        cmd += ["--model", args.model] if args.model else ["--profile", args.profile]
        self.log = RESULTS / f".serve-{self.port}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"lifecycle serve exited:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/ready", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"lifecycle serve not ready in 300 s:\n{self.log.read_text()}")
            time.sleep(0.5)
        self.model = requests.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.unlink(missing_ok=True)


async def one(client, model: str, text: str) -> dict:
    """One streamed chat request: latency, time to first token, tokens, or what went wrong."""
    import openai

    start = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": text}],
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except openai.APIStatusError as exc:
        return {"status": exc.status_code}
    except openai.APIError as exc:
        return {"status": 0, "error": repr(exc)}
    return {"status": 200, "s": time.perf_counter() - start, "ttft": first, "tokens": tokens}


async def level(url: str, model: str, inputs: list[str], clients: int, per_client: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)

    async def user(i: int) -> list[dict]:
        return [
            await one(client, model, inputs[(i * per_client + k) % len(inputs)])
            for k in range(per_client)
        ]

    start = time.perf_counter()
    done = [r for rs in await asyncio.gather(*(user(i) for i in range(clients))) for r in rs]
    wall = time.perf_counter() - start
    await client.close()
    ok = [r for r in done if r["status"] == 200]
    latencies = sorted(r["s"] for r in ok)
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    return {
        "clients": clients,
        "requests": len(done),
        "errors": len(done) - len(ok),
        "req_per_s": len(ok) / wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p95_s": latencies[max(0, int(0.95 * len(latencies)) - 1)] if latencies else None,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
    }


async def overload(url: str, model: str, inputs: list[str], clients: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    done = await asyncio.gather(
        *(one(client, model, inputs[i % len(inputs)]) for i in range(clients))
    )
    await client.close()
    statuses: dict[str, int] = {}
    for r in done:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"clients": clients, "statuses": statuses}


def eval_inputs(profile: str) -> list[str]:
    from lifecycle_dagster.ml.data import read_rows
    from lifecycle_dagster.ml.usecase_loader import load_use_case

    uc = load_use_case(profile=profile)
    rows = read_rows(uc.data.eval) if uc.data.eval else read_rows(uc.data.train)
    return [r[uc.task.input_field] for r in rows[:64]]


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="demo", help="use case whose champion to serve")
    parser.add_argument("--model", help="registered model name (default: <use case>-onnx)")
    parser.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--per-client", type=int, default=4, help="requests each client sends")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    inputs = eval_inputs(args.profile)
    RESULTS.mkdir(exist_ok=True)
    rows = []
    for mode, max_batch in (("one at a time", "1"), ("batched", "16")):
        server = Server(args, "--max-batch", max_batch, "--max-queue", "256")
        try:
            for clients in levels:
                got = asyncio.run(
                    level(server.url, server.model["id"], inputs, clients, args.per_client)
                )
                rows.append({"mode": mode, **got})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    server = Server(args, "--max-batch", "4", "--max-queue", "4")
    try:
        past = asyncio.run(overload(server.url, server.model["id"], inputs, 32))
    finally:
        server.stop()
    top = max(levels)
    by = {(r["mode"], r["clients"]): r for r in rows}
    ratio = by[("batched", top)]["tokens_per_s"] / by[("one at a time", top)]["tokens_per_s"]
    model = server.model
    lines = [
        f"Model server load, {model['id']} v{model['version']} ({model['variant']}), "
        f"{args.threads} ORT threads, {args.per_client} streamed chat requests per client, "
        "one sitting:",
        "",
        "| decoding | clients | requests | errors | req/s | tokens/s | p50 s | p95 s | TTFT p50 s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['errors']} | "
            f"{fmt(r['req_per_s'])} | {fmt(r['tokens_per_s'], 1)} | {fmt(r['p50_s'])} | "
            f"{fmt(r['p95_s'])} | {fmt(r['ttft_p50_s'])} |"
        )
    lines += [
        "",
        f"Batching at {top} clients: {ratio:.2f}x the tokens/s of one request at a time.",
        f"Past the queue (max 4 waiting, batches of 4, {past['clients']} clients at once): "
        + ", ".join(f"{n} x {s}" for s, n in sorted(past["statuses"].items())),
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "serving.md").write_text(text)
    (RESULTS / "serving.json").write_text(
        json.dumps({"model": model, "rows": rows, "overload": past, "ratio": ratio}, indent=2)
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
