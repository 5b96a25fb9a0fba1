"""The re-adaptation policy (ml/readaptation.py): the ladder, the budget, the typed decision."""

import time

import pytest

from lifecycle_dagster.ml.readaptation import Decision, decide, next_attempt
from lifecycle_dagster.ml.sft import SFTMethodConfig
from lifecycle_dagster.ml.usecase import LadderStep


def test_next_attempt_walks_the_ladder_within_the_budget(use_case):
    first, why = next_attempt(use_case, 1, SFTMethodConfig(max_steps=150), elapsed_minutes=1)
    assert first.attempt == 2
    assert first.adaptation.model_dump(exclude_none=True) == {
        "method": "lora",
        "lora_r": 16,
        "max_steps": 300,
    }
    assert first.alignment.model_dump(exclude_none=True) == {}
    assert why.startswith("attempt 2 of 3 next")
    second, _ = next_attempt(use_case, 2, SFTMethodConfig(max_steps=300), elapsed_minutes=2)
    assert second.attempt == 3 and second.adaptation.method == "full"
    spent, why = next_attempt(use_case, 3, SFTMethodConfig(), elapsed_minutes=3)
    assert spent is None and why == "budget spent: 3 of 3 attempts made"
    late, why = next_attempt(use_case, 1, SFTMethodConfig(), elapsed_minutes=10_000)
    assert late is None and why.startswith("wall-time budget spent")


def test_alignment_rungs_change_steps_and_kl_weight(use_case):
    ladder = [LadderStep(alignment_max_steps_factor=3, alignment={"beta": 0.1})]
    uc = use_case.model_copy(
        update={"readaptation": use_case.readaptation.model_copy(update={"ladder": ladder})}
    )
    esc, _ = next_attempt(uc, 1, uc.adaptation, elapsed_minutes=0)
    assert esc.alignment.model_dump(exclude_none=True) == {
        "max_steps": 3 * uc.alignment.max_steps,
        "beta": 0.1,
    }
    assert esc.adaptation.model_dump(exclude_none=True) == {}
    # The run configs the sensor sends are partial updates of the same declarations.
    assert uc.alignment.updated(esc.alignment).beta == 0.1
    assert uc.adaptation.updated(esc.adaptation) == uc.adaptation


def test_the_decision_travels_as_json_and_is_rechecked_when_read(use_case):
    now = time.time()
    decision = decide(
        use_case,
        passed=False,
        failed=["rouge_l"],
        attempt=1,
        current=use_case.adaptation,
        started_at=now - 60,
        now=now,
    )
    assert decision.next is not None and decision.next.attempt == 2
    back = Decision.model_validate(decision.model_dump(mode="json"))
    assert back == decision
    # Read in time it stands; read after the wall-time budget it is withdrawn, with the reason.
    assert back.at(now + 60).next is not None
    stale = back.at(now + 60 * (use_case.readaptation.max_wall_minutes + 5))
    assert stale.next is None and stale.reason.startswith("wall-time budget spent")
    assert "no further run" in stale.summary()
    passed = decide(
        use_case,
        passed=True,
        failed=[],
        attempt=2,
        current=use_case.adaptation,
        started_at=now,
        now=now,
    )
    assert passed.next is None and passed.summary().endswith(
        "verdict pass at attempt 2: nothing to do"
    )


def test_a_rung_is_a_validated_partial_update(use_case):
    rung = LadderStep(adaptation={"lora_r": 32})
    assert use_case.adaptation.updated(rung.adaptation).lora_r == 32
    assert use_case.adaptation.updated(rung.adaptation).scaling_alpha == 64
    with pytest.raises(ValueError, match="lora_r"):
        LadderStep(adaptation={"lora_r": 0})
    with pytest.raises(ValueError, match="unknown_field|Extra inputs"):
        LadderStep(adaptation={"unknown_field": 1})


def test_a_flat_rung_from_an_older_use_case_reads_as_partial_updates():
    rung = LadderStep.model_validate(
        {"method": "lora", "lora_r": 16, "max_steps_factor": 2, "beta": 0.1, "learning_rate": None}
    )
    assert rung.adaptation.model_dump(exclude_none=True) == {"method": "lora", "lora_r": 16}
    assert rung.alignment.model_dump(exclude_none=True) == {"beta": 0.1}
    assert rung.max_steps_factor == 2


def test_an_alignment_only_rung_says_so(use_case):
    ladder = [LadderStep(alignment={"beta": 0.2})]
    uc = use_case.model_copy(
        update={"readaptation": use_case.readaptation.model_copy(update={"ladder": ladder})}
    )
    esc, why = next_attempt(uc, 1, uc.adaptation, elapsed_minutes=0)
    assert esc.describe() == "alignment beta 0.2" and why.endswith("alignment beta 0.2")


def test_a_factor_never_asks_for_zero_steps(use_case):
    ladder = [LadderStep(max_steps_factor=0.001, alignment_max_steps_factor=0.001)]
    uc = use_case.model_copy(
        update={"readaptation": use_case.readaptation.model_copy(update={"ladder": ladder})}
    )
    esc, _ = next_attempt(uc, 1, SFTMethodConfig(max_steps=10), elapsed_minutes=0)
    assert esc.adaptation.max_steps == 1 and esc.alignment.max_steps == 1
