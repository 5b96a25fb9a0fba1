"""Re-adaptation policy: after a verdict, what the next attempt is, or why there is none.

One decision, taken by ``decide`` when evaluation records its verdict and read back by the sensor
(``Decision`` travels as JSON metadata and is validated on the way in). The budget (attempts, ladder
rungs, wall time since attempt 1) is checked by one function, ``budget_spent``: at the verdict, and
again by the sensor when it acts, since a verdict read late (the daemon was down) may be stale.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lifecycle_dagster.ml.sft import SFTMethodConfig
from lifecycle_dagster.ml.usecase import AdaptationUpdate, AlignmentUpdate, UseCase


class Escalation(BaseModel):
    """The next attempt: partial updates of the use case's adaptation and alignment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempt: int = Field(gt=1)
    adaptation: AdaptationUpdate
    alignment: AlignmentUpdate

    def describe(self) -> str:
        parts = [
            f"{name} {words}"
            for name, words in (
                ("adaptation", _words(self.adaptation)),
                ("alignment", _words(self.alignment)),
            )
            if words
        ]
        return ", ".join(parts) or "the same settings"


class Decision(BaseModel):
    """A verdict and what it calls for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    use_case: str
    verdict: Literal["pass", "fail"]
    attempt: int = Field(ge=1)
    failed: list[str] = Field(default_factory=list)
    method: str = Field(description="The adaptation method of this attempt.")
    max_attempts: int
    max_wall_minutes: float
    started_at: float = Field(description="When attempt 1 started (epoch seconds).")
    next: Escalation | None = None
    reason: str

    def at(self, now: float) -> Decision:
        """This decision as it stands at ``now``: an escalation past the budget is withdrawn."""
        if self.next is None:
            return self
        spent = budget_spent(
            self.next.attempt - 1,
            self.max_attempts,
            None,
            (now - self.started_at) / 60,
            self.max_wall_minutes,
        )
        if spent is None:
            return self
        return self.model_copy(update={"next": None, "reason": spent})

    def summary(self) -> str:
        """One line for a sensor tick or a log."""
        if self.verdict == "pass":
            return f"{self.use_case}: verdict pass at attempt {self.attempt}: nothing to do"
        failed = ", ".join(self.failed)
        if self.next is None:
            return (
                f"{self.use_case}: verdict fail ({failed}) at attempt {self.attempt}; "
                f"{self.reason}: no further run"
            )
        return f"{self.use_case}: {self.escalation_reason()}; launched attempt {self.next.attempt}"

    def escalation_reason(self) -> str:
        """Why the next attempt runs, and what changes in it (the run's reason tag)."""
        nxt = self.next.describe() if self.next is not None else "nothing"
        return (
            f"attempt {self.attempt} failed {', '.join(self.failed)} with {self.method}; "
            f"escalating to {nxt}"
        )


def budget_spent(
    attempt: int,
    max_attempts: int,
    rungs: int | None,
    elapsed_minutes: float,
    max_wall_minutes: float,
) -> str | None:
    """Why no attempt may follow ``attempt`` (attempts, ladder rungs or wall time), else None."""
    if attempt >= max_attempts:
        return f"budget spent: {attempt} of {max_attempts} attempts made"
    if rungs is not None and attempt - 1 >= rungs:
        return f"ladder exhausted: all {rungs} rungs tried"
    if elapsed_minutes >= max_wall_minutes:
        return (
            f"wall-time budget spent: {elapsed_minutes:.0f} of {max_wall_minutes:g} minutes "
            "since attempt 1 started"
        )
    return None


def next_attempt(
    uc: UseCase, attempt: int, current: SFTMethodConfig, elapsed_minutes: float
) -> tuple[Escalation | None, str]:
    """The escalation the use case's ladder gives after ``attempt`` (trained with ``current``), or
    None with the reason the budget is spent."""
    r = uc.readaptation
    spent = budget_spent(
        attempt, r.max_attempts, len(r.ladder), elapsed_minutes, r.max_wall_minutes
    )
    if spent:
        return None, spent
    rung = r.ladder[attempt - 1]
    adaptation = rung.adaptation.model_dump(exclude_none=True)
    if rung.max_steps_factor:
        adaptation["max_steps"] = max(1, int(current.max_steps * rung.max_steps_factor))
    alignment = rung.alignment.model_dump(exclude_none=True)
    if rung.alignment_max_steps_factor:
        alignment["max_steps"] = max(
            1, int(uc.alignment.max_steps * rung.alignment_max_steps_factor)
        )
    # Applied here, so a rung that cannot apply fails at the verdict, not in the next run.
    uc.adaptation.updated(adaptation)
    uc.alignment.updated(alignment)
    nxt = Escalation(
        attempt=attempt + 1,
        adaptation=AdaptationUpdate(**adaptation),
        alignment=AlignmentUpdate(**alignment),
    )
    return nxt, f"attempt {attempt + 1} of {r.max_attempts} next: {nxt.describe()}"


def decide(
    uc: UseCase,
    *,
    passed: bool,
    failed: list[str],
    attempt: int,
    current: SFTMethodConfig,
    started_at: float,
    now: float,
) -> Decision:
    """The verdict of ``attempt`` and what it calls for."""
    if passed:
        nxt, reason = None, f"verdict pass at attempt {attempt}: nothing to do"
    else:
        nxt, reason = next_attempt(uc, attempt, current, (now - started_at) / 60)
    return Decision(
        use_case=uc.name,
        verdict="pass" if passed else "fail",
        attempt=attempt,
        failed=failed,
        method=current.method,
        max_attempts=uc.readaptation.max_attempts,
        max_wall_minutes=uc.readaptation.max_wall_minutes,
        started_at=started_at,
        next=nxt,
        reason=reason,
    )


def _words(update: BaseModel) -> str:
    given = update.model_dump(exclude_none=True)
    return ", ".join(f"{k} {v}" for k, v in given.items())
