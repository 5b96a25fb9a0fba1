"""`lifecycle init` and `lifecycle validate`: a use case drafted from a data file, read back by the
loader as written; a use case checked without running anything, every fault named, exit 2."""

import csv
import json

import pytest

from lifecycle_dagster import cli
from lifecycle_dagster.ml.errors import InputError
from lifecycle_dagster.ml.scaffold import draft
from lifecycle_dagster.ml.usecase_loader import load_use_case

INTENTS = ["billing", "outage", "cancel"]


def _csv(path, header, rows):
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _tickets(path, n=40):
    return _csv(
        path,
        ["Ticket #", "Customer Message (raw)", "Routing Queue", "Agent"],
        [
            [
                f"T{i:03d}",
                f"message {i}: my {INTENTS[i % 3]} problem, please help",
                INTENTS[i % 3],
                "ann" if i % 2 else "bob",
            ]
            for i in range(n)
        ],
    )


def test_init_drafts_a_classification_that_loads_as_written(tmp_path, capsys):
    data = _tickets(tmp_path / "tickets export.csv")
    out = tmp_path / "uc.yaml"
    assert cli.main(["init", "--data", str(data), "--out", str(out)]) == 0
    assert "classification" in capsys.readouterr().out
    uc = load_use_case(out, profile="tiny")
    assert (uc.name, uc.kind.name, uc.primary_metric) == (
        "tickets_export",
        "classification",
        "accuracy",
    )
    assert sorted(uc.task.labels) == sorted(INTENTS)
    assert uc.data.columns == {
        "input": "Customer Message (raw)",
        "target": "Routing Queue",
        "id": "Ticket #",
    }
    assert uc.data.train == data and uc.data.eval is None
    assert "# not used: Agent" in out.read_text()
    # The profile still shrinks it, and its primary threshold lands on accuracy.
    assert (
        uc.base_model.scratch.hidden_size == 64 and uc.evaluation.thresholds["accuracy"].min == 0.2
    )
    assert cli.main(["init", "--data", str(data), "--out", str(out)]) == 2  # no overwrite
    assert "--force" in capsys.readouterr().err


def test_init_guesses_extraction_qa_and_summarisation(tmp_path):
    rows = [
        {
            "text": f"Call Ann on day {i} at {i}pm about the long report number {i}",
            "slots": {"name": "Ann", "day": i, "urgent": i % 2 == 0},
            "answer": f"day {i}",
            "summary": f"Ann is called about report {i} which is rather long to read",
        }
        for i in range(30)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = draft(path)
    assert (found.kind, found.target) == ("extraction", "slots")
    assert found.fields == {"name": "string", "day": "integer", "urgent": "boolean"}
    assert draft(path, "question_answering").target == "answer"
    found = draft(path, "summarisation")
    assert (found.target, found.input) == ("answer", "text")  # the shorter text is the output
    with pytest.raises(ValueError, match="'ner' is not a task kind"):
        draft(path, "ner")


def test_validate_passes_a_good_use_case_and_names_every_fault_of_a_bad_one(tmp_path, capsys):
    data = _tickets(tmp_path / "t.csv")
    out = tmp_path / "uc.yaml"
    cli.main(["init", "--data", str(data), "--out", str(out)])
    capsys.readouterr()
    assert cli.main(["validate", str(out), "--profile", "tiny"]) == 0
    printed = capsys.readouterr().out
    assert "31 rows" in printed and "9 rows, held out of t.csv" in printed  # 3 of 13-14 a label
    assert "stratified by target" in printed and "lifecycle validate: ok" in printed
    lines = data.read_text().splitlines()
    lines[4] = lines[4].replace(",billing,", ",refund,")
    lines[5] = lines[5].replace("T004", "T001")
    data.write_text("\n".join(lines) + "\n")
    text = out.read_text().replace("thresholds: {}", "thresholds: {rouge_l: {min: 0.3}}")
    (tmp_path / "bad.yaml").write_text(text)
    # A bad threshold is refused before the data is read; the data faults once it is fixed.
    assert cli.main(["validate", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "'rouge_l' is not a metric of classification" in err
    assert cli.main(["validate", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[1] == "2 faults:"
    assert err[2].startswith(f"{data}:5: field 'target': 'refund' is not one of the labels")
    assert err[3].startswith(f"{data}:6: field 'id': duplicate id 'T001'")


def test_init_refuses_a_file_it_cannot_draft_from(tmp_path, capsys):
    one = _csv(tmp_path / "one.csv", ["text"], [["a"], ["b"]])
    assert cli.main(["init", "--data", str(one), "--out", str(tmp_path / "x.yaml")]) == 2
    assert "needs an input and a target column" in capsys.readouterr().err
    with pytest.raises(InputError, match="file not found"):
        draft(tmp_path / "missing.csv")
