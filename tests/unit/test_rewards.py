"""Alignment's reward and the attempt's candidate: pairs whose rejected response is the SFT model's
worse answer, a reward model too weak to trust, and the better of the SFT and aligned models."""

from dataclasses import dataclass

from lifecycle_dagster.ml.align import better_of
from lifecycle_dagster.ml.data import PLAIN, build_pairs, load_task_data
from lifecycle_dagster.ml.reward import weak_reward, with_sft_rejections
from lifecycle_dagster.ml.usecase_loader import load_use_case


@dataclass
class Scored:
    primary: float
    mean_reward: float
    metric: str = "accuracy"


def test_the_better_model_on_the_primary_metric_is_the_candidate():
    assert better_of(Scored(0.5, 1.0), Scored(0.6, 0.9))[0] == "aligned"
    kept, why = better_of(Scored(0.6, 1.0), Scored(0.5, 1.4))
    assert kept == "sft" and "accuracy 0.6000 -> 0.5000" in why
    # A tie on the metric: the reward decides (the news-headline case: reward fell).
    assert better_of(Scored(0.5, 1.125), Scored(0.5, 1.078))[0] == "sft"
    assert better_of(Scored(0.5, 1.0), Scored(0.5, 1.2))[0] == "aligned"


def test_a_weak_reward_model_is_named_and_a_strong_one_passes(use_case):
    assert weak_reward(use_case, 0.65) is None  # the default floor is 0.6
    strict = use_case.model_copy(
        update={"reward": use_case.reward.model_copy(update={"min_pairwise_accuracy": 0.7})}
    )
    assert "65% of held-out pairs" in weak_reward(strict, 0.65)
    assert weak_reward(strict, None) is None  # a verifiable reward has no ranking to judge


def test_rejected_responses_are_the_sft_models_worse_answers(tiny_base, runtime):
    from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer

    uc = load_use_case(
        profile="tiny", overrides={"data": {"preferences_train": None, "preferences_eval": None}}
    )
    task = load_task_data(uc)
    rows = {n: build_pairs(uc, task[n].rows[:12]) for n in ("train", "eval")}
    calls = []

    def load():
        calls.append(1)
        return load_causal_lm(tiny_base, runtime), load_tokenizer(tiny_base)

    out, sampled = with_sft_rejections(uc, rows, load, PLAIN, max_new_tokens=12, batch_size=8)
    assert calls == [1] and sampled > 0
    for name in rows:
        for before, after in zip(rows[name], out[name], strict=True):
            assert after["chosen"] == before["chosen"] and after["prompt"] == before["prompt"]
            assert after["rejected"] != after["chosen"]
    swapped = [a for n in rows for b, a in zip(rows[n], out[n], strict=True) if a != b]
    assert len(swapped) == sampled
    # With preference files (or a verifiable reward) nothing is generated.
    files = load_use_case(profile="tiny")
    assert with_sft_rejections(files, rows, load, PLAIN, max_new_tokens=4, batch_size=4) == (
        rows,
        0,
    )
    assert calls == [1]
