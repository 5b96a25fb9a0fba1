"""A product catalogue no model has read, and questions about it: the ``catalogue_qa`` use case.

Norrvik Instruments and its products are invented here (seeded, so the files are the same on
every machine), so a base model cannot know a product's battery life, weight or designer: it can
only answer from the documents. Each product is one Markdown document; each question names the
document that answers it (``doc_id``), so retrieval's recall can be measured. Every fact of a
product is asked once, in the train or in the eval split, never in both: without retrieval an
eval answer is a guess.

Text and data: written for this project, licensed with it.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

KINDS = [
    ("thermal camera", "handheld thermal camera"),
    ("drone", "survey drone"),
    ("thermostat", "smart thermostat"),
    ("microscope", "field microscope"),
    ("weather station", "compact weather station"),
    ("sonar", "fish-finding sonar"),
    ("spectrometer", "pocket spectrometer"),
    ("data logger", "rugged data logger"),
]
NAMES = [
    "Kestrel", "Osprey", "Heron", "Merlin", "Plover", "Curlew", "Dunlin", "Gannet", "Shrike",
    "Tern", "Avocet", "Bittern", "Godwit", "Lapwing", "Petrel", "Siskin", "Wigeon", "Linnet",
]  # fmt: skip
COLOURS = [
    "slate grey",
    "signal orange",
    "moss green",
    "glacier white",
    "cobalt blue",
    "desert sand",
]
CITIES = ["Tallberg", "Vesterholm", "Ornskog", "Lidvik", "Maraby", "Kvarnsund", "Eskerud"]
DESIGNERS = [
    "Ines Marlow", "Tobias Fenn", "Ada Lindqvist", "Ravi Osei", "Mira Castell", "Jonas Eberly",
    "Lena Sorvik", "Omar Haddad", "Clara Voss", "Pavel Dunin",
]  # fmt: skip
QUESTIONS = {
    "battery": ("What is the battery life of the {product}?", "{battery} hours"),
    "weight": ("How much does the {product} weigh?", "{weight} grams"),
    "year": ("In which year was the {product} released?", "{year}"),
    "city": ("Where is the {product} assembled?", "{city}"),
    "designer": ("Who was the lead designer of the {product}?", "{designer}"),
    "warranty": ("How long is the warranty of the {product}?", "{warranty} years"),
    "colour": ("What colour is the {product}?", "{colour}"),
}


def products(r: random.Random, n: int) -> list[dict]:
    """``n`` products with distinct names (a bird and a model number) and their facts."""
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n:
        name = f"{r.choice(NAMES)} {r.choice('ABCKMRSVX')}{r.randint(2, 9)}"
        if name in seen:
            continue
        seen.add(name)
        kind, long_kind = r.choice(KINDS)
        out.append(
            {
                "product": name,
                "kind": kind,
                "long_kind": long_kind,
                "battery": r.choice([4, 6, 8, 9, 10, 12, 14, 16, 18, 20, 24, 30]),
                "weight": r.choice(range(120, 2400, 20)),
                "year": r.randint(2011, 2024),
                "city": r.choice(CITIES),
                "designer": r.choice(DESIGNERS),
                "warranty": r.choice([1, 2, 3, 5]),
                "colour": r.choice(COLOURS),
            }
        )
    return out


def document(p: dict) -> str:
    """The product's page in the catalogue, in Markdown."""
    return (
        f"# {p['product']}\n\n"
        f"The {p['product']} is a {p['long_kind']} made by Norrvik Instruments. It was released "
        f"in {p['year']} and is sold in {p['colour']}.\n\n"
        f"## Specifications\n\n"
        f"- Battery life: {p['battery']} hours on a full charge\n"
        f"- Weight: {p['weight']} grams\n\n"
        f"## Making and service\n\n"
        f"The {p['product']} is assembled in {p['city']}. Its lead designer was "
        f"{p['designer']}. Every unit carries a {p['warranty']}-year warranty "
        f"({p['warranty']} years) from the date of purchase.\n"
    )


def doc_id(p: dict) -> str:
    return p["product"].lower().replace(" ", "-")


def generate(seed: int = 23, n_products: int = 60, eval_share: float = 0.2) -> dict:
    """``{"docs": {file name: text}, "train.jsonl": rows, "eval.jsonl": rows}``: every fact of
    every product asked once, a share of them held out for evaluation."""
    r = random.Random(seed)
    items = products(r, n_products)
    questions = []
    for p in items:
        for fact, (question, answer) in QUESTIONS.items():
            questions.append(
                {
                    "question": question.format(**p),
                    "answer": answer.format(**p),
                    "doc_id": doc_id(p),
                    "fact": fact,
                }
            )
    r.shuffle(questions)
    n_eval = round(len(questions) * eval_share)
    out: dict = {"docs": {f"{doc_id(p)}.md": document(p) for p in items}}
    for split, rows in (("eval", questions[:n_eval]), ("train", questions[n_eval:])):
        out[f"{split}.jsonl"] = [{"id": f"{split}-{i:04d}", **q} for i, q in enumerate(rows)]
    return out


def write(folder: Path, seed: int = 23) -> list[Path]:
    """The use case's documents (``docs/``) and splits (``data/``) under ``folder``."""
    files = generate(seed)
    paths = []
    for name, text in files.pop("docs").items():
        path = folder / "docs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    for name, rows in files.items():
        path = folder / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":  # pragma: no cover
    from lifecycle_dagster.ml.usecase import USECASES_DIR

    for written in write(Path(sys.argv[1]) if len(sys.argv) > 1 else USECASES_DIR / "catalogue_qa"):
        print(written)
