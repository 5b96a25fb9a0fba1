"""The evaluation verdict: every lifecycle stage's model scored on one split by the use case's suite,
the candidate held to the thresholds, and the warnings a reviewer wants (fine-tuning beat prompting,
alignment kept the reward)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from lifecycle_dagster.ml.data import EvalSplit
from lifecycle_dagster.ml.evaluate import score_split
from lifecycle_dagster.ml.progress import Log
from lifecycle_dagster.ml.retrieval import mean_groundedness
from lifecycle_dagster.ml.suite import SuiteConfig, bootstrap_interval, per_example_metric

CANDIDATE = "aligned"


@dataclass
class Candidate:
    """A model to score: how to load it (with the tokenizer that prompts it) and its prompts."""

    load: Callable[[], tuple]
    prompts: Sequence[str]
    perplexity: bool = True  # of the references, given its prompts (with the suite)
    retrieval: bool = True  # its prompts carry the split's passages (when it has them)


@dataclass
class Assessment:
    suite: str
    results: dict[str, dict[str, float]]
    per_example: list[dict]
    metric: str  # the use case's primary metric
    tables: dict[str, list[dict]] = field(default_factory=dict)  # the candidate's (confusion)
    verdicts: list[dict] = field(default_factory=list)

    @property
    def candidate(self) -> dict[str, float]:
        return self.results[CANDIDATE]

    @property
    def passed(self) -> bool:
        return all(v["passed"] for v in self.verdicts)

    @property
    def failed(self) -> list[str]:
        return [v["metric"] for v in self.verdicts if not v["passed"]]

    def shortfall(self) -> str:
        """The thresholds missed, each with its figure and interval, in words."""
        parts = []
        for v in self.verdicts:
            if v["passed"]:
                continue
            ci = (
                f" (95% CI {v['ci_low']:.4f}-{v['ci_high']:.4f})" if v["ci_low"] is not None else ""
            )
            parts.append(f"{v['metric']} {v['value']:.4f}{ci} misses {v['threshold']}")
        return "; ".join(parts) or "none"

    @property
    def rows(self) -> list[dict]:
        """One row per model: the comparison table (None where a model has no such figure)."""
        keys = list(dict.fromkeys(k for metrics in self.results.values() for k in metrics))
        return [
            {
                "model": name,
                **{k: None if metrics.get(k) is None else round(metrics[k], 4) for k in keys},
            }
            for name, metrics in self.results.items()
        ]

    def flat_metrics(self) -> dict[str, float]:
        """The candidate's metrics, then every model's as ``<model>_<metric>``."""
        return {
            **self.candidate,
            **{f"{m}_{k}": v for m, res in self.results.items() for k, v in res.items()},
            "passed": int(self.passed),
        }

    def warnings(self) -> dict[str, tuple[bool, dict]]:
        """Soft checks: fine-tuning beat prompting alone; alignment kept the SFT model's reward."""
        sft, prompt, aligned = self.results["sft"], self.results["prompt_baseline"], self.candidate
        m = self.metric
        return {
            "sft_beats_prompt_baseline": (
                sft[m] > prompt[m],
                {f"sft_{m}": sft[m], f"prompt_{m}": prompt[m]},
            ),
            "alignment_keeps_reward": (
                aligned["mean_reward"] >= sft["mean_reward"],
                {"sft_reward": sft["mean_reward"], "aligned_reward": aligned["mean_reward"]},
            ),
        }


def assess(
    candidates: Mapping[str, Candidate],
    split: EvalSplit,
    *,
    suite: SuiteConfig,
    thresholds: Mapping,
    reward=None,
    max_new_tokens: int,
    batch_size: int,
    log: Log | None = None,
    pass_on: str = "estimate",
) -> Assessment:
    """Score every candidate on ``split`` (one loaded at a time) and hold the ``aligned`` one to
    ``thresholds`` (metric -> ``Threshold``), each judged as ``judge`` says."""
    results, per_example, tables = {}, [], {}
    for name, cand in candidates.items():
        model, tok = cand.load()
        res = score_split(
            model,
            tok,
            split,
            prompts=cand.prompts,
            perplexity=cand.perplexity,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            reward=reward,
            suite=suite,
            log=log,
            stage=f"evaluation[{name}]",
        )
        del model
        results[name] = res.metrics()
        grounded = mean_groundedness(res.predictions, split.rows) if cand.retrieval else None
        if grounded is not None:  # how much of each answer its passages hold
            results[name]["groundedness"] = grounded
        if name == CANDIDATE:
            tables = res.tables
        per_example += [{"model": name, **row} for row in res.per_example]
    out = Assessment(
        suite=suite.fingerprint(split.use_case.task.type),
        results=results,
        per_example=per_example,
        metric=res.metric,
        tables=tables,
    )
    out.verdicts = [
        judge(m, t, out.candidate[m], per_example, pass_on) for m, t in thresholds.items()
    ]
    return out


def judge(metric: str, threshold, value: float, per_example: list[dict], pass_on: str) -> dict:
    """One threshold's verdict on the candidate: its mean with a 95% bootstrap interval over the
    examples (none for a metric only defined on the whole split, such as macro-F1), passed on
    the mean or on the whole interval (``evaluation.pass_on``)."""
    values = per_example_metric(per_example, metric, CANDIDATE)
    ci = bootstrap_interval([values[k] for k in sorted(values)])
    on_interval = pass_on == "interval" and ci is not None
    return {
        "metric": metric,
        "value": round(value, 4),
        "ci_low": round(ci[0], 4) if ci else None,
        "ci_high": round(ci[1], 4) if ci else None,
        "threshold": threshold.describe(),
        "judged_on": "interval" if on_interval else "estimate",
        "passed": threshold.holds_over(*ci) if on_interval else threshold.holds(value),
    }
