"""The feedback store: responses and feedback on them, durable once acknowledged, and the
preference pairs they make for the reward model."""

import os
import signal
import subprocess
import sys

import pytest

from lifecycle_dagster.ml.feedback import FeedbackStore, Response, feedback_pairs
from lifecycle_dagster.ml.usecase_loader import load_use_case


def answer(store, rid: str, task_input: str | None, text: str, use_case="uc") -> None:
    prompt = f"<prompt for {task_input}>"
    store.record_response(Response(rid, use_case, "m", "1", "chat", task_input, prompt, text))


@pytest.fixture
def store(tmp_path):
    return FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")


def test_ratings_and_preferences_make_pairs(store):
    answer(store, "a", "dialogue 1", "good summary")
    answer(store, "b", "dialogue 1", "bad summary")
    answer(store, "c", "dialogue 1", "so-so summary")
    answer(store, "d", "dialogue 2", "another")
    answer(store, "e", None, "a raw completion")  # not a task input: never a pair
    answer(store, "f", None, "another raw one")
    store.add_rating("a", 1)
    store.add_rating("b", -1)
    store.add_rating("d", 1)  # alone for its input: no pair
    store.add_preference("c", "b")
    store.add_preference("e", "f")
    pairs = store.preference_pairs("uc")
    got = {(p["prompt"], p["chosen"], p["rejected"]) for p in pairs}
    assert got == {
        ("dialogue 1", "good summary", "bad summary"),
        ("dialogue 1", "so-so summary", "bad summary"),
    }
    assert store.count("uc") == 5 and store.latest_seq("uc") == 5
    assert store.count("uc", after_seq=3) == 2
    # As of an earlier feedback: only what had been said then.
    assert len(store.preference_pairs("uc", upto_seq=1)) == 0
    assert len(store.preference_pairs("uc", upto_seq=2)) == 1
    # The latest rating of a response counts: b turned good, a bad.
    store.add_rating("b", 1)
    store.add_rating("a", -1)
    flipped = {(p["chosen"], p["rejected"]) for p in store.preference_pairs("uc")}
    assert ("bad summary", "good summary") in flipped


def test_feedback_names_what_is_wrong(store):
    answer(store, "a", "dialogue 1", "x")
    answer(store, "b", "dialogue 2", "y")
    answer(store, "c", "dialogue 1", "z", use_case="other")
    with pytest.raises(LookupError, match="'nope'"):
        store.add_rating("nope", 1)
    with pytest.raises(ValueError, match="different prompts"):
        store.add_preference("a", "b")
    with pytest.raises(ValueError, match="use case"):
        store.add_preference("a", "c")
    assert store.count("uc") == 0


def test_acknowledged_feedback_survives_a_killed_process(tmp_path):
    """A process stores a rating, says so, and is SIGKILLed at once: the rating is there."""
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    script = f"""
import os, signal, sys
from lifecycle_dagster.ml.feedback import FeedbackStore, Response
store = FeedbackStore({url!r})
store.record_response(Response("a", "uc", "m", "1", "chat", "in", "p", "out"))
got = store.add_rating("a", 1)
print(got.id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    acknowledged = done.stdout.strip()
    assert acknowledged.startswith("fb-")
    store = FeedbackStore(url)
    assert store.count("uc") == 1
    with store.engine.connect() as conn:
        ids = [r[0] for r in conn.exec_driver_sql("select id from feedback")]
    assert ids == [acknowledged]
    assert not os.path.exists(tmp_path / "feedback.db-journal")


def test_the_preference_data_takes_the_pairs_unless_told_not_to(tmp_path):
    uc = load_use_case(profile="tiny")
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore(url)
    answer(store, "a", "dialogue", "good", use_case=uc.name)
    answer(store, "b", "dialogue", "bad", use_case=uc.name)
    store.add_preference("a", "b")
    taken = feedback_pairs(uc, url)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in taken.rows] == [
        ("dialogue", "good", "bad")
    ]
    assert taken.seq == 1 and taken.total == 1
    off = uc.model_copy(update={"feedback": uc.feedback.model_copy(update={"use": False})})
    assert feedback_pairs(off, url).rows == []
