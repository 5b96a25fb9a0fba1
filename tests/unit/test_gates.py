"""Gates rest on more than noise: a threshold's figure comes with a bootstrap interval over the
examples, and a use case may ask for the whole interval to meet it."""

from lifecycle_dagster.ml.suite import bootstrap_interval
from lifecycle_dagster.ml.usecase import Threshold
from lifecycle_dagster.ml.verdict import judge


def _rows(values, metric="accuracy", model="aligned"):
    return [{"model": model, "id": str(i), metric: v} for i, v in enumerate(values)]


def test_a_noisy_pass_holds_on_the_estimate_but_not_on_the_interval():
    values = [1.0] * 11 + [0.0] * 9  # 0.55 over 20 examples: the interval reaches well below 0.5
    rows = _rows(values) + _rows([0.0] * 20, model="sft")  # another model's rows are not counted
    t = Threshold(min=0.5)
    on_mean = judge("accuracy", t, 0.55, rows, "estimate")
    assert on_mean["passed"] and on_mean["judged_on"] == "estimate"
    assert on_mean["ci_low"] < 0.5 < 0.55 < on_mean["ci_high"]
    on_interval = judge("accuracy", t, 0.55, rows, "interval")
    assert not on_interval["passed"] and on_interval["judged_on"] == "interval"
    # Clear of the threshold, both pass; a max threshold needs the interval's top under it.
    clear = _rows([1.0] * 19 + [0.0])
    assert judge("accuracy", t, 0.95, clear, "interval")["passed"]
    near = _rows([1.0] * 9 + [0.0] * 11)  # 0.45: under a 0.5 maximum, its interval is not
    assert judge("accuracy", Threshold(max=0.5), 0.45, near, "estimate")["passed"]
    assert not judge("accuracy", Threshold(max=0.5), 0.45, near, "interval")["passed"]


def test_a_corpus_metric_has_no_interval_and_is_judged_on_its_value():
    verdict = judge("macro_f1", Threshold(min=0.5), 0.6, _rows([1.0] * 5), "interval")
    assert verdict["ci_low"] is None and verdict["judged_on"] == "estimate" and verdict["passed"]


def test_the_interval_is_seeded_and_narrows_with_more_examples():
    few, many = [1.0, 0.0] * 10, [1.0, 0.0] * 200
    assert bootstrap_interval(few) == bootstrap_interval(few)
    lo_few, hi_few = bootstrap_interval(few)
    lo_many, hi_many = bootstrap_interval(many)
    assert hi_many - lo_many < (hi_few - lo_few) / 2
    assert bootstrap_interval([0.3]) is None


def test_the_compression_budget_can_be_judged_on_the_drops_interval():
    from lifecycle_dagster.ml.compress import CompressConfig, drop_interval, quality_drop

    fp32 = [1.0, 0.0] * 20
    variant = [1.0, 0.0] * 18 + [0.0, 0.0] * 2  # two examples lost: a 0.05 drop, noisy
    ci = drop_interval(0.05, fp32, variant)
    assert ci[0] <= 0.05 <= ci[1] and ci[1] > 0.06
    budget = CompressConfig(max_metric_drop=0.06)
    ref = {"accuracy": 0.5}
    assert quality_drop(ref, "accuracy", 0.45, None, budget, ci, "estimate")[2]
    assert not quality_drop(ref, "accuracy", 0.45, None, budget, ci, "interval")[2]
    assert drop_interval(0.0, None, variant) is None  # a corpus-only metric: no interval
