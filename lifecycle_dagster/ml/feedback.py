"""What the deployed model's users say about its answers, kept durably: every served response
(its id, use case, model version, the task input and the answer) and every piece of feedback on
them: a rating of one response, or a preference between two responses to the same prompt.

A SQL database through SQLAlchemy: SQLite (WAL, synchronous FULL: an acknowledged write survives
a crash) on one machine, PostgreSQL where the model server and Dagster run apart. Feedback turns
into preference pairs (task input, chosen answer, rejected answer) for the reward model: each
preference is one; ratings of two answers to the same input are one when the ratings differ."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

METADATA = sa.MetaData()
RESPONSES = sa.Table(
    "responses",
    METADATA,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("use_case", sa.String(200), nullable=False, index=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("version", sa.String(50), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),  # chat or completion
    # The task input when the request was one (a chat with one user message), else null.
    sa.Column("task_input", sa.Text, nullable=True),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("completion", sa.Text, nullable=False),
    sa.Column("trace_id", sa.String(100), nullable=True),
    sa.Column("created", sa.Float, nullable=False),
)
FEEDBACK = sa.Table(
    "feedback",
    METADATA,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(100), nullable=False, unique=True),
    sa.Column("use_case", sa.String(200), nullable=False, index=True),
    sa.Column("kind", sa.String(20), nullable=False),  # rating or preference
    sa.Column("response_id", sa.String(100), nullable=True),
    sa.Column("rating", sa.Integer, nullable=True),
    sa.Column("chosen_id", sa.String(100), nullable=True),
    sa.Column("rejected_id", sa.String(100), nullable=True),
    sa.Column("comment", sa.Text, nullable=True),
    sa.Column("created", sa.Float, nullable=False),
)


@dataclass(frozen=True)
class Response:
    id: str
    use_case: str
    model: str
    version: str
    kind: str
    task_input: str | None
    prompt: str
    completion: str
    trace_id: str | None = None


@dataclass(frozen=True)
class Feedback:
    id: str
    seq: int
    use_case: str
    kind: str
    response_id: str | None = None
    rating: int | None = None
    chosen_id: str | None = None
    rejected_id: str | None = None


class FeedbackStore:
    def __init__(self, url: str):
        self.url = url
        self.engine = sa.create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":

            @sa.event.listens_for(self.engine, "connect")
            def _durable(conn, _record):
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA busy_timeout=30000")

        METADATA.create_all(self.engine)

    def record_response(self, response: Response) -> None:
        with self.engine.begin() as conn:
            conn.execute(RESPONSES.insert().values(**vars(response), created=time.time()))

    def set_trace(self, response_id: str, trace_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                RESPONSES.update().where(RESPONSES.c.id == response_id).values(trace_id=trace_id)
            )

    def response(self, response_id: str) -> Response:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(*[RESPONSES.c[f] for f in Response.__dataclass_fields__]).where(
                    RESPONSES.c.id == response_id
                )
            ).first()
        if row is None:
            raise LookupError(f"no response {response_id!r} is known to this server")
        return Response(**row._mapping)

    def add_rating(self, response_id: str, rating: int, comment: str | None = None) -> Feedback:
        response = self.response(response_id)
        return self._add(
            response.use_case, "rating", response_id=response_id, rating=rating, comment=comment
        )

    def add_preference(
        self, chosen_id: str, rejected_id: str, comment: str | None = None
    ) -> Feedback:
        chosen, rejected = self.response(chosen_id), self.response(rejected_id)
        if chosen.use_case != rejected.use_case:
            raise ValueError(
                f"{chosen_id!r} answered use case {chosen.use_case!r} and {rejected_id!r} "
                f"{rejected.use_case!r}: a preference compares answers to the same prompt"
            )
        if chosen.prompt != rejected.prompt:
            raise ValueError(
                f"{chosen_id!r} and {rejected_id!r} answered different prompts: a preference "
                "compares answers to the same prompt"
            )
        return self._add(
            chosen.use_case,
            "preference",
            chosen_id=chosen_id,
            rejected_id=rejected_id,
            comment=comment,
        )

    def _add(self, use_case: str, kind: str, **fields) -> Feedback:
        feedback_id = f"fb-{uuid.uuid4().hex}"
        with self.engine.begin() as conn:  # committed (and synced) before it is acknowledged
            seq = conn.execute(
                FEEDBACK.insert().values(
                    id=feedback_id, use_case=use_case, kind=kind, created=time.time(), **fields
                )
            ).inserted_primary_key[0]
        fields.pop("comment", None)
        return Feedback(feedback_id, int(seq), use_case, kind, **fields)

    def latest_seq(self, use_case: str) -> int:
        """The sequence number of the use case's latest feedback (0: none): a data version."""
        with self.engine.connect() as conn:
            seq = conn.execute(
                sa.select(sa.func.max(FEEDBACK.c.seq)).where(FEEDBACK.c.use_case == use_case)
            ).scalar()
        return int(seq or 0)

    def count(self, use_case: str, after_seq: int = 0) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(FEEDBACK)
                    .where(FEEDBACK.c.use_case == use_case, FEEDBACK.c.seq > after_seq)
                ).scalar()
            )

    def use_cases(self) -> list[str]:
        with self.engine.connect() as conn:
            return sorted(conn.execute(sa.select(FEEDBACK.c.use_case).distinct()).scalars())

    def preference_pairs(self, use_case: str, upto_seq: int | None = None) -> list[dict]:
        """Preference rows (id, prompt: the task input, chosen, rejected) from the use case's
        feedback up to ``upto_seq``, as the use case's preference files have them. Only answers
        to a task input (a chat with one user message) make pairs; repeated pairs count once."""
        where = [FEEDBACK.c.use_case == use_case]
        if upto_seq is not None:
            where.append(FEEDBACK.c.seq <= upto_seq)
        with self.engine.connect() as conn:
            feedback = conn.execute(sa.select(FEEDBACK).where(*where).order_by(FEEDBACK.c.seq))
            feedback = [row._mapping for row in feedback]
            ids = {f[k] for f in feedback for k in ("response_id", "chosen_id", "rejected_id")}
            responses = {
                row.id: row
                for row in conn.execute(
                    sa.select(RESPONSES).where(RESPONSES.c.id.in_([i for i in ids if i]))
                )
            }
        pairs: dict[tuple[str, str, str], str] = {}

        def add(chosen, rejected, source: str) -> None:
            if chosen.task_input is None or chosen.task_input != rejected.task_input:
                return
            if chosen.completion.strip() == rejected.completion.strip():
                return
            pairs.setdefault((chosen.task_input, chosen.completion, rejected.completion), source)

        ratings: dict[str, int] = {}  # the latest rating of each response
        for f in feedback:
            if f["kind"] == "preference":
                add(responses[f["chosen_id"]], responses[f["rejected_id"]], f["id"])
            else:
                ratings[f["response_id"]] = f["rating"]
        rated = sorted(ratings, key=lambda r: (responses[r].task_input or "", r))
        for _, group in itertools.groupby(rated, key=lambda r: responses[r].task_input):
            group = list(group)
            for a, b in itertools.combinations(group, 2):
                if ratings[a] != ratings[b]:
                    good, bad = (a, b) if ratings[a] > ratings[b] else (b, a)
                    add(responses[good], responses[bad], f"ratings {good} > {bad}")
        return [
            {"id": f"feedback-{i:05d}", "prompt": p, "chosen": c, "rejected": r, "source": s}
            for i, ((p, c, r), s) in enumerate(pairs.items())
        ]


FEEDBACK_FILE = "feedback.json"  # in the preference dataset: what of the feedback it took in


@dataclass
class FeedbackPairs:
    """The preference rows users' feedback makes for a use case, as of feedback ``seq``."""

    rows: list[dict]
    seq: int
    total: int  # feedback (ratings and preferences) up to seq

    def write(self, folder) -> None:
        (Path(folder) / FEEDBACK_FILE).write_text(
            json.dumps({"pairs": len(self.rows), "seq": self.seq, "feedback": self.total})
        )

    @staticmethod
    def read(folder) -> dict:
        """What a preference dataset took in (no feedback: zeros)."""
        path = Path(folder) / FEEDBACK_FILE
        return (
            json.loads(path.read_text()) if path.exists() else {"pairs": 0, "seq": 0, "feedback": 0}
        )


def feedback_pairs(use_case, url: str) -> FeedbackPairs:
    """The use case's feedback pairs to merge into its reward data (none where it opts out)."""
    if not use_case.feedback.use:
        return FeedbackPairs([], 0, 0)
    store = FeedbackStore(url)
    seq = store.latest_seq(use_case.name)
    pairs = store.preference_pairs(use_case.name, seq)
    rows = [{k: p[k] for k in ("id", "prompt", "chosen", "rejected")} for p in pairs]
    return FeedbackPairs(rows, seq, store.count(use_case.name) - store.count(use_case.name, seq))


def feedback_used(preference_dataset) -> dict:
    """MLflow params saying how much user feedback a preference dataset holds."""
    took = FeedbackPairs.read(preference_dataset)
    return {"feedback.pairs": took["pairs"], "feedback.seq": took["seq"]}
