"""The lifecycle report: the phases' cheat sheet, with this run's measurements beside it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    name: str
    assets: tuple[str, ...]
    typical: str
    objective: str


PHASES = (
    Phase(
        "pre-training",
        ("base_model",),
        "days to months (no training when a model is reused)",
        "next-token prediction",
    ),
    Phase("prompt engineering", ("prompt_baseline",), "no training", "task performance"),
    Phase(
        "prompt tuning and fine-tuning", ("sft_adapter",), "minutes to hours", "task performance"
    ),
    Phase(
        "alignment with a reward model",
        ("reward_model", "aligned_model"),
        "minutes to hours, once a reward model exists",
        "alignment with preferences",
    ),
    Phase("evaluation", ("evaluation",), "minutes", "measure every stage on one split"),
    Phase(
        "compression and deployment",
        ("distilled_model", "onnx_model", "champion_model"),
        "minutes to hours",
        "inference performance",
    ),
)


def _customised(phase: str, meta: dict[str, dict]) -> str:
    if phase == "pre-training":
        source = meta.get("base_model", {}).get("source", "?")
        return (
            "all weights (trained from scratch)"
            if source == "scratch"
            else f"none ({source} model reused)"
        )
    if phase == "prompt engineering":
        return "prompts only"
    if phase == "prompt tuning and fine-tuning":
        sft = meta.get("sft_adapter", {})
        frac = sft.get("trainable_fraction")
        kind = {
            "lora": "adapter weights (LoRA)",
            "prompt_tuning": "soft prompt (prompt tuning)",
            "full": "all weights",
        }.get(sft.get("method", ""), sft.get("method", "?"))
        return f"{kind}, {frac:.2%} of parameters" if frac is not None else kind
    if phase == "alignment with a reward model":
        return "reward head + weights (reward model); adapter weights, merged (policy)"
    if phase == "compression and deployment":
        return (
            f"none; weights re-encoded ({meta.get('onnx_model', {}).get('selected_variant', '?')})"
        )
    return "none"


def _compute(phase: str, meta: dict[str, dict]) -> str:
    m = lambda a: meta.get(a, {})  # noqa: E731
    if phase == "pre-training":
        b = m("base_model")
        parts = [f"{b.get('parameters', 0):.3g} params"]
        if b.get("pretrain_tokens"):
            parts.append(f"{b['pretrain_tokens']:.3g} tokens seen")
        if b.get("pretrain_estimate"):
            parts.append(f"compute-optimal pre-training here: {b['pretrain_estimate']}")
        return "; ".join(parts)
    if phase == "prompt engineering":
        return "inference only"
    if phase == "prompt tuning and fine-tuning":
        s = m("sft_adapter")
        return f"{s.get('max_steps', '?')} steps on {s.get('device', '?')}"
    if phase == "alignment with a reward model":
        a = m("aligned_model")
        return (
            f"reward model {m('reward_model').get('max_steps', '?')} steps; "
            f"{a.get('method', '?')} {a.get('max_steps', '?')} steps on {a.get('device', '?')}"
        )
    if phase == "evaluation":
        return "inference only (4 models)"
    o = m("onnx_model")
    if o:
        return (
            f"export of {o.get('selected_variant', '?')} (policy {o.get('policy', '?')}); "
            f"{o.get('size_ratio', 0):.1f}x smaller, "
            f"{o.get('speedup', 0):.1f}x faster decode than PyTorch"
        )
    return "-"


def build_report(meta: dict[str, dict]) -> tuple[str, list[dict]]:
    """Markdown and rows from each asset's latest materialization metadata."""
    rows = []
    for phase in PHASES:
        seconds = sum(float(meta.get(a, {}).get("duration_s", 0.0)) for a in phase.assets)
        rows.append(
            {
                "phase": phase.name,
                "measured": f"{seconds:.1f} s",
                "seconds": seconds,
                "customised": _customised(phase.name, meta),
                "objective": phase.objective,
                "compute used": _compute(phase.name, meta),
                "typical": phase.typical,
            }
        )
    cols = ["phase", "measured", "typical", "customised", "objective", "compute used"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines), rows


def report_body(
    name: str, markdown: str, rows: list[dict], meta: dict[str, dict]
) -> tuple[str, dict[str, dict[str, float]]]:
    """The report in markdown (phases, the evaluation table, the deployed ONNX variant) and the
    panels of its plot (wall time per phase, the primary metric per stage)."""
    evaluation, onnx = meta.get("evaluation", {}), meta.get("onnx_model", {})
    m = evaluation.get("primary_metric") or meta.get("use_case", {}).get("primary_metric", "")
    body = (
        f"# Lifecycle report: {name}\n\n{markdown}\n\n"
        f"## Evaluation on the held-out split\n\n{evaluation.get('comparison', '')}\n"
    )
    if onnx:
        body += (
            f"\nONNX ({onnx.get('selected_variant')}): {m} "
            f"{onnx.get(f'onnx_{m}', float('nan')):.4f} against PyTorch "
            f"{onnx.get(f'reference_{m}', float('nan')):.4f}; "
            f"{onnx.get('size_ratio', 0):.1f}x smaller, "
            f"{onnx.get('speedup', 0):.1f}x decode speed.\n"
        )
    labels = {"base": "base", "prompt_baseline": "prompt", "sft": "SFT", "aligned": "aligned"}
    scores = {
        label: evaluation[f"{key}_{m}"]
        for key, label in labels.items()
        if evaluation.get(f"{key}_{m}") is not None
    }
    if onnx.get(f"onnx_{m}") is not None:
        scores["ONNX"] = onnx[f"onnx_{m}"]
    durations = {r["phase"]: r["seconds"] for r in rows}
    return body, {"wall time per phase (s)": durations, f"{m} per stage": scores}
