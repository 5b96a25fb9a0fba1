"""The data a team already has: JSONL, CSV, Parquet and save_to_disk directories, a column mapping,
a seeded (stratified) split of a single file, every fault in every file named at once, lengths in
tokens, near-duplicates, and prompts through an instruct model's chat template."""

import csv
import json

import pytest

from lifecycle_dagster.ml.data import (
    PromptFormat,
    check_token_lengths,
    format_prompt,
    load_task_data,
    near_duplicates,
    sft_records,
    validate_data,
)
from lifecycle_dagster.ml.errors import InputError, InputErrors
from lifecycle_dagster.ml.usecase import UseCase

LABELS = ["billing", "outage", "cancel"]
WORDS = {
    "billing": "I was charged twice on my invoice",
    "outage": "the service is down since noon",
    "cancel": "please close my account for good",
}


def _rows(n: int = 30) -> list[dict]:
    return [
        {
            "Ticket #": f"T-{i:03d}",
            "Customer message (raw)": f"{WORDS[LABELS[i % 3]]}, ticket number {i}",
            "Queue": LABELS[i % 3],
        }
        for i in range(n)
    ]


def _use_case(train, **data) -> UseCase:
    return UseCase.model_validate(
        {
            "name": "tickets",
            "task": {"type": "classification", "instruction": "Route: {labels}.", "labels": LABELS},
            "data": {
                "train": str(train),
                "columns": {
                    "id": "Ticket #",
                    "input": "Customer message (raw)",
                    "target": "Queue",
                },
                "min_rows": 2,
                **data,
            },
        }
    )


def _write_csv(path, rows, delimiter=","):
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_with_unusual_columns_is_mapped_and_split_seeded_and_stratified(tmp_path):
    uc = _use_case(_write_csv(tmp_path / "tickets.csv", _rows()))
    splits = load_task_data(uc)
    train, held = splits["train"], splits["eval"]
    assert {r["target"] for r in held.rows} == set(LABELS)  # every label in both splits
    assert [sum(r["target"] == lab for r in held.rows) for lab in LABELS] == [2, 2, 2]
    assert len(train.rows) + len(held.rows) == 30
    assert not {r["id"] for r in train.rows} & {r["id"] for r in held.rows}
    assert held.split["seed"] == 0 and held.split["stratified_by"] == "target"
    # Seeded: the same split again; another seed, another split.
    assert [r["id"] for r in load_task_data(uc)["eval"].rows] == [r["id"] for r in held.rows]
    other = load_task_data(_use_case(tmp_path / "tickets.csv", split_seed=7))["eval"]
    assert [r["id"] for r in other.rows] != [r["id"] for r in held.rows]


def test_parquet_and_tsv_read_like_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    _write_csv(tmp_path / "t.tsv", rows, delimiter="\t")
    via_csv = load_task_data(_use_case(_write_csv(tmp_path / "t.csv", rows)))
    for name in ("t.parquet", "t.tsv"):
        splits = load_task_data(_use_case(tmp_path / name))
        assert splits["eval"].rows == via_csv["eval"].rows, name


def test_save_to_disk_dataset_dict_uses_its_validation_split_and_label_names(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features(
        {
            "Ticket #": Value("string"),
            "Customer message (raw)": Value("string"),
            "Queue": ClassLabel(names=LABELS),
        }
    )

    def dataset(rows):
        return Dataset.from_list(
            [{**r, "Queue": LABELS.index(r["Queue"])} for r in rows], features=features
        )

    rows = _rows()
    DatasetDict({"train": dataset(rows[:24]), "validation": dataset(rows[24:])}).save_to_disk(
        tmp_path / "ds"
    )
    splits = load_task_data(_use_case(tmp_path / "ds"))
    assert [r["id"] for r in splits["eval"].rows] == [r["Ticket #"] for r in rows[24:]]
    assert splits["eval"].split is None  # the dataset's own split, not one the pipeline made
    assert splits["train"].rows[1]["target"] == "outage"  # the class label's name, not 1


def test_every_fault_in_every_file_is_named_at_once(tmp_path):
    rows = _rows(12)
    rows[3]["Queue"] = "refund"
    rows[5]["Customer message (raw)"] = ""
    rows[7]["Ticket #"] = rows[2]["Ticket #"]
    train = _write_csv(tmp_path / "train.csv", rows)
    bad_eval = tmp_path / "eval.csv"
    bad_eval.write_text("Ticket #,Customer message (raw)\nA,hello\n")
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"q{i}", "chosen": "yes", "rejected": r}) + "\n"
            for i, r in enumerate(["no", "Yes.", "no way"])
        )
    )
    uc = _use_case(
        train, eval=str(bad_eval), preferences_train=str(prefs), preferences_eval=str(prefs)
    )
    with pytest.raises(InputErrors) as err:
        validate_data(uc)
    lines = str(err.value).splitlines()
    assert lines[0].endswith("faults:")
    assert f"{train}:5: field 'target': 'refund' is not one of the labels" in str(err.value)
    assert f"{train}:7: field 'input': empty" in lines
    assert any(ln.startswith(f"{train}:9: field 'id': duplicate id 'T-002'") for ln in lines)
    assert any(
        ln.startswith(f"{bad_eval}:1: field 'target': no such column (data.columns maps it")
        for ln in lines
    )
    # Both preference files (the same file here): the pair whose responses match once normalised.
    assert (
        lines.count(
            f"{prefs}:2: field 'rejected': the same response as chosen (a pair must differ)"
        )
        == 2
    )
    assert lines[-1].startswith(str(prefs))  # the last line names a fault too


def test_a_parquet_fault_names_its_row_and_a_wrong_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(12)
    # Numbers where text is expected, and a missing value on row 3.
    data = {
        "Ticket #": [r["Ticket #"] for r in rows],
        "Customer message (raw)": [None if i == 2 else i for i in range(12)],
        "Queue": [r["Queue"] for r in rows],
    }
    pq.write_table(pa.table(data), tmp_path / "t.parquet")
    with pytest.raises(InputErrors) as err:
        load_task_data(_use_case(tmp_path / "t.parquet"))
    text = str(err.value)
    assert f"{tmp_path / 't.parquet'}:row 3: field 'input': missing" in text
    assert f"{tmp_path / 't.parquet'}:row 1: field 'input': expected a string, got int" in text


def test_malformed_csv_and_unknown_format_are_refused_with_the_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('Ticket #,Customer message (raw),Queue\nA,"unterminated,billing\n')
    with pytest.raises(InputError, match=rf"{path}:2: .*cells|{path}:2: not valid CSV"):
        load_task_data(_use_case(path))
    odd = tmp_path / "t.data"
    odd.write_text("x")
    with pytest.raises(
        InputError, match="cannot tell the format from '.data'; name it in data.format"
    ):
        load_task_data(_use_case(odd))


def test_rows_without_an_id_column_are_named_by_their_line(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "Ticket #"} for r in _rows()]
    uc = UseCase.model_validate(
        {
            "name": "t",
            "task": {"type": "classification", "instruction": "i", "labels": LABELS},
            "data": {
                "train": str(_write_csv(tmp_path / "t.csv", rows)),
                "columns": {"input": "Customer message (raw)", "target": "Queue"},
                "min_rows": 2,
            },
        }
    )
    ids = [r["id"] for r in load_task_data(uc)["train"].rows]
    assert ids[0].startswith("t-") and len(set(ids)) == len(ids)


def test_near_duplicates_are_found_after_normalisation():
    train = [{"id": "a", "input": "The router is broken!"}]
    held = [{"id": "b", "input": "router is  BROKEN"}, {"id": "c", "input": "all fine"}]
    assert near_duplicates(train, held, "input") == ["b"]


SMOL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_an_instruct_model_is_prompted_through_its_chat_template(tmp_path):
    uc = _use_case(_write_csv(tmp_path / "t.csv", _rows()))
    chat = PromptFormat(SMOL_TEMPLATE, None, "<|im_end|>")
    prompt = format_prompt(uc, "my bill", [{"input": "down again", "target": "outage"}], chat)
    assert prompt == (
        "<|im_start|>user\nRoute: billing, outage, cancel.\n\ndown again\n\nAnswer:<|im_end|>\n"
        "<|im_start|>assistant\noutage<|im_end|>\n"
        "<|im_start|>user\nRoute: billing, outage, cancel.\n\nmy bill\n\nAnswer:<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    record = sft_records(uc, [{"input": "my bill", "target": "billing"}], chat)[0]
    assert record["completion"] == "billing<|im_end|>\n"
    # The plain format is the template as text, and the answer after a space.
    plain = sft_records(uc, [{"input": "my bill", "target": "billing"}])[0]
    assert plain["prompt"].endswith("my bill\n\nAnswer:") and plain["completion"] == " billing"

    class Tok:
        chat_template, bos_token, eos_token = SMOL_TEMPLATE, None, "<|im_end|>"

    assert PromptFormat.of(uc, Tok()).chat
    never = uc.model_copy(update={"task": uc.task.model_copy(update={"chat_template": "never"})})
    assert not PromptFormat.of(never, Tok()).chat
    always = uc.model_copy(update={"task": uc.task.model_copy(update={"chat_template": "always"})})
    Tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        PromptFormat.of(always, Tok())


def _on_local_model(uc: UseCase, model) -> UseCase:
    raw = uc.model_dump(mode="json")
    return UseCase.model_validate({**raw, "base_model": {"source": "local", "path": str(model)}})


def test_lengths_are_checked_in_the_base_models_tokens(tmp_path, tiny_base):
    rows = _rows()
    rows[4]["Customer message (raw)"] = "outage " * 200  # ~200 tokens over a 256-token context
    uc = _on_local_model(_use_case(_write_csv(tmp_path / "long.csv", rows)), tiny_base)
    with pytest.raises(InputError) as err:
        check_token_lengths(uc, load_task_data(uc), None)
    assert f"{tmp_path / 'long.csv'}:6: field 'input':" in str(err.value)
    assert "more than the model's 256-token context" in str(err.value)
    uc = _on_local_model(_use_case(_write_csv(tmp_path / "ok.csv", _rows())), tiny_base)
    measured = check_token_lengths(uc, load_task_data(uc), None)
    assert measured["token_check"] == "tokens of the base model"
    assert 0 < measured["longest_tokens"] < 256 and measured["prompt_format"] == "plain"


def test_the_reward_model_reads_what_it_was_trained_on_in_either_format(tmp_path):
    """trl's RewardTrainer trains on prompt + formatted answer + EOS; the scorer rebuilds that
    text from a preference record or from a raw generation, in the chat format and the plain one
    (a scorer that added a space and dropped the turn's end ranked 36% of held-out pairs right on
    SmolLM2-135M-Instruct; reading the trained text, 100%)."""
    from lifecycle_dagster.ml.data import preference_records
    from lifecycle_dagster.ml.evaluate import reward_text

    uc = _use_case(_write_csv(tmp_path / "t.csv", _rows()))
    pair = [{"prompt": "my bill", "chosen": "billing", "rejected": "outage"}]
    for fmt, eos in [
        (PromptFormat(SMOL_TEMPLATE, None, "<|im_end|>"), "<|im_end|>"),
        (PromptFormat(), "</s>"),
    ]:
        record = preference_records(uc, pair, fmt)[0]
        trained = record["prompt"] + record["chosen"]
        trained = trained if trained.endswith(eos) else trained + eos  # as trl adds it
        assert reward_text(fmt, eos, record["prompt"], record["chosen"]) == trained
        assert reward_text(fmt, eos, record["prompt"], "billing\nand more text") == trained
        if fmt.chat:  # a generation that ran on past the end of its turn
            assert reward_text(fmt, eos, record["prompt"], "billing<|im_end|>\n<|im_start|>") == (
                trained
            )
