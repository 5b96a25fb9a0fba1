"""Promotion policy: is the candidate worse than the champion beyond noise, and does it take the
champion's place. Plain decisions; the registry resource reads versions and moves aliases."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lifecycle_dagster.ml.data import read_rows
from lifecycle_dagster.ml.objectstore import local_copy
from lifecycle_dagster.ml.suite import paired_bootstrap, per_example_metric
from lifecycle_dagster.ml.verdict import CANDIDATE


@dataclass(frozen=True)
class Champion:
    """What the registry knows of the current champion version."""

    version: str
    tags: dict[str, str]

    def value(self, metric: str) -> float | None:
        tag = self.tags.get(f"metric.{metric}")
        return float(tag) if tag is not None else None


def compare_with_champion(
    champion: Champion | None, suite: str, metric: str, rows: list[dict]
) -> dict:
    """The candidate against the champion, example by example, when both were scored by the same
    suite; ``regressed`` when it is worse beyond noise (paired bootstrap, 95%)."""
    out = {"regressed": False, "champion_version": None, "summary": "", "mean_diff": None}
    if champion is None:
        out["summary"] = "no champion yet"
        return out
    out["champion_version"] = champion.version
    where = champion.tags.get("evaluation.path", "")
    try:  # the champion's evaluation: a folder, or an object URI fetched into the cache
        table = local_copy(where) / "per_example.jsonl" if where else Path("-")
    except (OSError, RuntimeError):
        table = Path("-")  # gone or incomplete: not comparable, said below
    if champion.tags.get("evaluation.suite") != suite or not table.is_file():
        out["summary"] = (
            f"champion v{champion.version} was scored by suite "
            f"{champion.tags.get('evaluation.suite', 'unknown')}, not {suite}: not comparable"
        )
        return out
    theirs = per_example_metric(read_rows(table), metric, CANDIDATE)
    cmp = paired_bootstrap(per_example_metric(rows, metric, CANDIDATE), theirs, metric)
    if cmp is None:
        out["summary"] = f"champion v{champion.version} shares no eval example: not comparable"
        return out
    out.update(
        regressed=cmp.worse_beyond_noise,
        summary=f"v{champion.version}: {cmp.describe()}",
        mean_diff=cmp.mean_diff,
        ci_low=cmp.low,
        ci_high=cmp.high,
    )
    return out


@dataclass
class Promotion:
    name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    value: float
    previous_version: str | None = None
    previous_value: float | None = None


def decide_promotion(
    name: str,
    version: str,
    champion: Champion | None,
    *,
    metric: str,
    value: float,
    passed: bool,
    higher_is_better: bool = True,
    min_improvement: float = 0.0,
    blocked: str = "",
    follow: Promotion | None = None,
) -> Promotion:
    """Whether ``version`` becomes the champion: it passed evaluation, nothing ``blocked`` it (a
    reason, e.g. a regression) and it beats the champion on ``metric`` by more than
    ``min_improvement``. With ``follow``, the decision taken for another model is applied (the ONNX
    artifact follows the aligned model it was exported from, so both champions are one model)."""
    previous = champion.value(metric) if champion is not None else None
    result = Promotion(
        name=name,
        version=version,
        promoted=False,
        reason="",
        metric=metric,
        value=value,
        previous_version=champion.version if champion is not None else None,
        previous_value=previous,
    )
    if champion is not None and champion.version == str(version):
        result.reason = f"v{version} is already the champion"
    elif follow is not None:
        result.promoted = follow.promoted
        result.reason = f"follows {follow.name} v{follow.version}: {follow.reason}"
    elif not passed:
        result.reason = "evaluation did not pass"
    elif blocked:
        result.reason = blocked
    elif champion is None:
        result.promoted, result.reason = True, "first champion"
    elif previous is None:
        result.promoted, result.reason = True, f"champion v{champion.version} has no {metric}"
    else:
        gain = value - previous if higher_is_better else previous - value
        result.promoted = gain > min_improvement
        verb = "beats" if result.promoted else "does not beat"
        result.reason = f"{metric} {value:.4f} {verb} champion v{champion.version} ({previous:.4f})"
    return result


def blocking_reason(verdict: dict, onnx: dict) -> str:
    """Why the evaluated candidate may not be promoted whatever it scores ('' when nothing blocks):
    it regressed against the champion, or the ONNX artifact was exported from another candidate."""
    if verdict.get("regressed"):
        return f"regressed against the champion: {verdict.get('vs_champion')}"
    if onnx.get("source_model") != f"{verdict['candidate_path']}/model":
        return "the ONNX artifact was exported from another candidate"
    return ""
