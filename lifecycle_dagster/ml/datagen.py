"""Generate the packaged use cases' data from one set of dialogues: summarisation with preference
pairs, and the same dialogues as a classification (the request's intent), an extraction (name, day
and time as JSON) and a question answering task (one question about a slot per dialogue).

The data is made by templates from a fixed seed, so it ships with the package, needs no download and
is reproducible: ``python -m lifecycle_dagster.ml.datagen <out_dir>`` rewrites the files byte for byte.

Each dialogue comes from one of several everyday scenarios with slot values (names, days, times,
items). The reference summary states the slot values plainly and politely. A preference pair puts that
reference (chosen) against a response that is either unfaithful (wrong slot values) or dismissive and
rude (rejected), which is what the reward model learns to tell apart.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

NAMES = [
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Pavel",
    "Quinn",
    "Rosa",
    "Sami",
    "Tara",
    "Umar",
    "Vera",
    "Will",
    "Yara",
    "Zoe",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["9 am", "10 am", "11 am", "noon", "2 pm", "3 pm", "4 pm", "6 pm", "7 pm", "8 pm"]
COUNTS = ["two", "three", "four", "five", "six"]
ITEMS = [
    "a laptop",
    "a blender",
    "a desk lamp",
    "running shoes",
    "a phone case",
    "a coffee grinder",
    "a winter coat",
    "a bookshelf",
]
CITIES = ["Lisbon", "Oslo", "Madrid", "Vienna", "Dublin", "Prague", "Athens", "Warsaw"]
DEVICES = ["router", "printer", "laptop", "tablet", "smart TV"]
FIXES = ["restarting it", "updating the firmware", "resetting the password", "replacing the cable"]
BOOKS = ["a history of Rome", "a cookbook", "a travel guide", "a chemistry textbook", "a novel"]
ROOMS = ["single room", "double room", "suite", "family room"]
NIGHTS = ["one night", "two nights", "three nights", "four nights"]

RUDE = [
    "Ugh, {name} wanted something again. Not my problem, whatever.",
    "Who cares. {name} rambled on and it was a waste of time.",
    "Honestly, {name} is annoying and this chat was pointless.",
    "Whatever, {name} complained. Figure it out yourself.",
    "Boring call with {name}. Nobody needs a summary of this nonsense.",
]


def _restaurant(r: random.Random) -> tuple[str, str, dict[str, str]]:
    s = {
        "name": r.choice(NAMES),
        "count": r.choice(COUNTS),
        "day": r.choice(DAYS),
        "time": r.choice(TIMES),
    }
    variants = [
        (
            "#Person1#: Hello, I would like to book a table for {count} on {day} at {time}.\n"
            "#Person2#: Of course. May I have your name, please?\n"
            "#Person1#: It is {name}.\n"
            "#Person2#: Thank you, {name}. Your table for {count} on {day} at {time} is confirmed."
        ),
        (
            "#Person1#: Hi, do you have a table for {count} people on {day}?\n"
            "#Person2#: We do. What time would suit you?\n"
            "#Person1#: {time}, please. The booking is for {name}.\n"
            "#Person2#: Done. We look forward to seeing you on {day} at {time}."
        ),
    ]
    summary = "{name} books a table for {count} on {day} at {time}."
    return r.choice(variants).format(**s), summary.format(**s), s


def _delivery(r: random.Random) -> tuple[str, str, dict[str, str]]:
    s = {"name": r.choice(NAMES), "item": r.choice(ITEMS), "day": r.choice(DAYS)}
    variants = [
        (
            "#Person1#: Hello, this is {name}. My order of {item} has not arrived yet.\n"
            "#Person2#: I am sorry about that. Let me check the tracking.\n"
            "#Person2#: There was a delay at the depot. It will arrive on {day}.\n"
            "#Person1#: Thank you for checking."
        ),
        (
            "#Person1#: Hi, I ordered {item} last week and it is late.\n"
            "#Person2#: May I have your name?\n"
            "#Person1#: {name}.\n"
            "#Person2#: Thanks, {name}. The courier will deliver {item} on {day}."
        ),
    ]
    summary = "{name}'s order of {item} is delayed and will arrive on {day}."
    return r.choice(variants).format(**s), summary.format(**s), s


def _doctor(r: random.Random) -> tuple[str, str, dict[str, str]]:
    s = {"name": r.choice(NAMES), "day": r.choice(DAYS), "time": r.choice(TIMES)}
    variants = [
        (
            "#Person1#: Good morning, I need to move my appointment. My name is {name}.\n"
            "#Person2#: Certainly, {name}. When would you like to come in?\n"
            "#Person1#: Is {day} possible?\n"
            "#Person2#: Yes, the doctor can see you on {day} at {time}."
        ),
        (
            "#Person1#: Hi, this is {name}. I cannot make my appointment this week.\n"
            "#Person2#: No problem. We have a free slot on {day} at {time}.\n"
            "#Person1#: That works for me, thanks."
        ),
    ]
    summary = "{name} moves the doctor's appointment to {day} at {time}."
    return r.choice(variants).format(**s), summary.format(**s), s


def _support(r: random.Random) -> tuple[str, str, dict[str, str]]:
    s = {"name": r.choice(NAMES), "device": r.choice(DEVICES), "fix": r.choice(FIXES)}
    variants = [
        (
            "#Person1#: Hello, my {device} stopped working this morning.\n"
            "#Person2#: I can help. Could you tell me your name?\n"
            "#Person1#: {name}.\n"
            "#Person2#: Thanks, {name}. Please try {fix}.\n"
            "#Person1#: That fixed it, thank you!"
        ),
        (
            "#Person1#: Hi, this is {name}. My {device} keeps failing.\n"
            "#Person2#: Sorry to hear that. Have you tried {fix}?\n"
            "#Person1#: Not yet. Let me try. It works now."
        ),
    ]
    summary = "{name}'s {device} is fixed by {fix}."
    return r.choice(variants).format(**s), summary.format(**s), s


def _hotel(r: random.Random) -> tuple[str, str, dict[str, str]]:
    s = {
        "name": r.choice(NAMES),
        "room": r.choice(ROOMS),
        "nights": r.choice(NIGHTS),
        "day": r.choice(DAYS),
    }
    variants = [
        (
            "#Person1#: Hello, I would like to reserve a {room} for {nights} from {day}.\n"
            "#Person2#: Certainly. Under which name?\n"
            "#Person1#: {name}.\n"
            "#Person2#: Your {room} is reserved for {nights} from {day}, {name}."
        ),
        (
            "#Person1#: Hi, is a {room} free from {day}?\n"
            "#Person2#: Yes. How long will you stay?\n"
            "#Person1#: {nights}. The name is {name}.\n"
            "#Person2#: All set. See you on {day}."
        ),
    ]
    summary = "{name} reserves a {room} for {nights} from {day}."
    return r.choice(variants).format(**s), summary.format(**s), s


def _flight(r: random.Random) -> tuple[str, str, dict[str, str]]:
    s = {"name": r.choice(NAMES), "city": r.choice(CITIES), "day": r.choice(DAYS)}
    variants = [
        (
            "#Person1#: Hello, I need to change my flight to {city}.\n"
            "#Person2#: Of course. What is your name?\n"
            "#Person1#: {name}. Could I fly on {day} instead?\n"
            "#Person2#: Yes, {name}. You are now booked to {city} on {day}."
        ),
        (
            "#Person1#: Hi, this is {name}. Can I move my trip to {city}?\n"
            "#Person2#: Which day would you prefer?\n"
            "#Person1#: {day}, if possible.\n"
            "#Person2#: Done. Your flight to {city} now leaves on {day}."
        ),
    ]
    summary = "{name} changes the flight to {city} to {day}."
    return r.choice(variants).format(**s), summary.format(**s), s


def _library(r: random.Random) -> tuple[str, str, dict[str, str]]:
    s = {"name": r.choice(NAMES), "book": r.choice(BOOKS), "day": r.choice(DAYS)}
    variants = [
        (
            "#Person1#: Hello, I would like to renew {book}.\n"
            "#Person2#: Sure. What is your name?\n"
            "#Person1#: {name}.\n"
            "#Person2#: Thank you, {name}. It is now due back on {day}."
        ),
        (
            "#Person1#: Hi, this is {name}. I have not finished {book} yet.\n"
            "#Person2#: I can extend the loan for you.\n"
            "#Person2#: The new due date is {day}.\n"
            "#Person1#: Great, thanks."
        ),
    ]
    summary = "{name} renews {book}, now due on {day}."
    return r.choice(variants).format(**s), summary.format(**s), s


SCENARIOS = [_restaurant, _delivery, _doctor, _support, _hotel, _flight, _library]


def _unfaithful(r: random.Random, summary: str, slots: dict[str, str]) -> str:
    """The reference with its slot values swapped for wrong ones."""
    pools = {
        "name": NAMES,
        "count": COUNTS,
        "day": DAYS,
        "time": TIMES,
        "item": ITEMS,
        "city": CITIES,
        "device": DEVICES,
        "fix": FIXES,
        "book": BOOKS,
        "room": ROOMS,
        "nights": NIGHTS,
    }
    out = summary
    for key, value in slots.items():
        if key == "name":
            continue
        wrong = r.choice([v for v in pools[key] if v != value])
        out = out.replace(value, wrong)
    return out


INTENTS = {
    "_restaurant": "restaurant booking",
    "_delivery": "late delivery",
    "_doctor": "doctor appointment",
    "_support": "tech support",
    "_hotel": "hotel reservation",
    "_flight": "flight change",
    "_library": "library renewal",
}
QUESTIONS = {
    "name": "What is the customer's name?",
    "count": "For how many people is the table?",
    "day": "On which day?",
    "time": "At what time?",
    "item": "What was ordered?",
    "city": "Where does the flight go?",
    "device": "Which device had a problem?",
    "fix": "What fixed the problem?",
    "book": "Which book is renewed?",
    "room": "Which room is reserved?",
    "nights": "How long is the stay?",
}


def dialogues(r: random.Random, n: int) -> list[dict]:
    """``n`` distinct dialogues with their summary, slot values and scenario."""
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n:
        scenario = r.choice(SCENARIOS)
        dialogue, summary, slots = scenario(r)
        if dialogue in seen:
            continue
        seen.add(dialogue)
        rows.append(
            {"dialogue": dialogue, "summary": summary, "_slots": slots, "_kind": scenario.__name__}
        )
    return rows


def generate_kinds(seed: int = 11, n_train: int = 320, n_eval: int = 80) -> dict[str, dict]:
    """The classification, extraction and QA use cases' files: ``{use case: {file: rows}}``."""
    r = random.Random(seed)
    rows = dialogues(r, n_train + n_eval)
    out: dict[str, dict] = {"dialogue_intent": {}, "dialogue_slots": {}, "dialogue_qa": {}}
    for split, items in (("train", rows[:n_train]), ("eval", rows[n_train:])):
        intent, slots, qa = [], [], []
        for i, row in enumerate(items):
            rid, s = f"{split}-{i:04d}", row["_slots"]
            intent.append({"id": rid, "dialogue": row["dialogue"], "intent": INTENTS[row["_kind"]]})
            fields = {k: s.get(k) for k in ("name", "day", "time")}
            slots.append({"id": rid, "dialogue": row["dialogue"], "slots": fields})
            slot = r.choice(sorted(s))
            question = f"{row['dialogue']}\n\nQuestion: {QUESTIONS[slot]}"
            qa.append({"id": rid, "question": question, "answer": s[slot]})
        out["dialogue_intent"][f"{split}.jsonl"] = intent
        out["dialogue_slots"][f"{split}.jsonl"] = slots
        out["dialogue_qa"][f"{split}.jsonl"] = qa
    return out


def generate(seed: int = 7, n_train: int = 320, n_eval: int = 80) -> dict[str, list[dict]]:
    r = random.Random(seed)
    rows = dialogues(r, n_train + n_eval)
    splits = {"train": rows[:n_train], "eval": rows[n_train:]}
    out: dict[str, list[dict]] = {}
    for split, items in splits.items():
        task, prefs = [], []
        for i, row in enumerate(items):
            rid = f"{split}-{i:04d}"
            task.append({"id": rid, "dialogue": row["dialogue"], "summary": row["summary"]})
            if r.random() < 0.6:
                rejected = r.choice(RUDE).format(name=row["_slots"]["name"])
            else:
                rejected = _unfaithful(r, row["summary"], row["_slots"])
            prefs.append(
                {
                    "id": rid,
                    "prompt": row["dialogue"],
                    "chosen": row["summary"],
                    "rejected": rejected,
                }
            )
        out[f"{split}.jsonl"] = task
        out[f"preferences_{split}.jsonl"] = prefs
    return out


def _write(out_dir: Path, files: dict[str, list[dict]]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in files.items():
        path = out_dir / name
        path.write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
        )
        paths.append(path)
    return paths


def write(out_dir: Path, seed: int = 7) -> list[Path]:
    """The summarisation use case's four files in ``out_dir``."""
    return _write(out_dir, generate(seed))


def write_all(usecases_dir: Path) -> list[Path]:
    """Every packaged use case's data under ``usecases_dir/<use case>/data``."""
    paths = write(usecases_dir / "dialogue_summarisation" / "data")
    for name, files in generate_kinds().items():
        paths += _write(usecases_dir / name / "data", files)
    return paths


if __name__ == "__main__":  # pragma: no cover
    from lifecycle_dagster.ml.usecase import USECASES_DIR

    for p in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else USECASES_DIR):
        print(p)
