"""Rendering for people: plots (PNG), markdown tables and JSON, for the Dagster UI and MLflow."""

from __future__ import annotations

import base64
import io

import dagster as dg


def render_png(
    curves: dict[str, list[tuple[int, float]]], title: str, xlabel: str = "step"
) -> bytes:
    """A small line plot of one or more curves, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=90)
    for name, points in curves.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def render_bars(panels: dict[str, dict[str, float]], title: str) -> bytes:
    """Side-by-side horizontal bar charts, one panel per mapping, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), dpi=90)
    axes = axes if len(panels) > 1 else [axes]
    for ax, (name, values) in zip(axes, panels.items(), strict=True):
        labels = list(values)
        ax.barh(labels, [values[k] for k in labels], color="#4f7cac")
        ax.invert_yaxis()
        ax.set_title(name)
        ax.grid(axis="x", alpha=0.3)
        for i, k in enumerate(labels):
            ax.text(values[k], i, f" {values[k]:.3g}", va="center", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def render_tradeoff(points: dict[str, dict], title: str, chosen: str | None = None) -> bytes:
    """Size against speed, one point per variant (``MB``, ``tok_s``, ``drop``: quality lost,
    ``ok``: within the budget), labelled with its quality loss; the chosen one ringed, those
    outside the budget hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
    for name, p in points.items():
        face = "#4f7cac" if p["ok"] else "none"
        ax.scatter(p["MB"], p["tok_s"], s=60, facecolors=face, edgecolors="#4f7cac")
        if name == chosen:
            ax.scatter(p["MB"], p["tok_s"], s=260, facecolors="none", edgecolors="#c0392b")
        ax.annotate(
            f"{name} ({-100 * p['drop']:+.1f} pts)", (p["MB"], p["tok_s"]),
            textcoords="offset points", xytext=(6, 4), fontsize=7,
        )  # fmt: skip
    ax.set_xlabel("size (MB)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def png_markdown(png: bytes, title: str) -> str:
    """Inline markdown (data URI) that the Dagster UI renders as an image."""
    return f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})"


def md_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [
            f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)
            for v in (row.get(c) for c in cols)
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def table(rows: list[dict]) -> dg.MetadataValue:
    """Rows as a Dagster table the UI can sort (numbers stay numbers, anything else is text)."""
    cols = list(dict.fromkeys(k for row in rows for k in row))

    def kind(values) -> str:
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, bool) for v in present):
            return "bool"
        if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
            return "float" if any(isinstance(v, float) for v in present) else "int"
        return "string"

    kinds = {c: kind([r.get(c) for r in rows]) for c in cols}

    def cell(value, k):
        if value is None or k != "string":
            return value
        return str(value)

    return dg.MetadataValue.table(
        records=[dg.TableRecord({c: cell(r.get(c), kinds[c]) for c in cols}) for r in rows],
        schema=dg.TableSchema(columns=[dg.TableColumn(c, kinds[c]) for c in cols]),
    )
