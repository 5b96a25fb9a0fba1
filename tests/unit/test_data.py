"""Data validation: every malformed file is refused with file, line and field."""

import json

import pytest

from lifecycle_dagster.ml import datagen
from lifecycle_dagster.ml.data import PREFERENCE_FIELDS, load_jsonl
from lifecycle_dagster.ml.errors import InputError
from lifecycle_dagster.ml.usecase import USECASES_DIR

FIELDS = ("id", "dialogue", "summary")
GOOD = [
    {"id": f"r{i}", "dialogue": f"#Person1#: hello {i}", "summary": f"greeting {i}"}
    for i in range(3)
]


def _file(tmp_path, lines: list[str] | bytes):
    path = tmp_path / "data.jsonl"
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("\n".join(lines) + "\n")
    return path


def _load(path, **kw):
    return load_jsonl(path, FIELDS, max_chars=kw.get("max_chars", 200), min_rows=1)


def test_valid_file_loads_with_stats(tmp_path):
    split = _load(_file(tmp_path, [json.dumps(r) for r in GOOD]))
    assert len(split.rows) == 3 and split.stats["rows"] == 3 and len(split.sha256) == 64


@pytest.mark.parametrize(
    ("line2", "field", "message"),
    [
        ('{"id": "x", "dialogue": "d"}', "summary", "missing"),
        ('{"id": "x", "dialogue": "d", "summary": 3}', "summary", "expected a string, got int"),
        ('{"id": "x", "dialogue": "  ", "summary": "s"}', "dialogue", "empty"),
        ('{"id": "r0", "dialogue": "other", "summary": "s"}', "id", "duplicate id"),
        (
            '{"id": "x", "dialogue": "' + "a" * 300 + '", "summary": "s"}',
            "dialogue",
            "300 characters",
        ),
        ('{"id": "x", "dialogue": "d", "summary": "s"', None, "invalid JSON"),
        ('["not", "an", "object"]', None, "expected a JSON object"),
    ],
)
def test_bad_row_names_file_line_field(tmp_path, line2, field, message):
    path = _file(tmp_path, [json.dumps(GOOD[0]), line2])
    with pytest.raises(InputError) as err:
        _load(path)
    assert err.value.path == str(path)
    assert err.value.line == 2
    assert err.value.field == field
    assert message in str(err.value)
    assert str(err.value).startswith(f"{path}:2: ")


def test_duplicate_row_content(tmp_path):
    dup = dict(GOOD[0], id="other")
    with pytest.raises(InputError, match="duplicate row"):
        _load(_file(tmp_path, [json.dumps(GOOD[0]), json.dumps(dup)]))


def test_empty_file(tmp_path):
    with pytest.raises(InputError, match="file is empty"):
        _load(_file(tmp_path, b""))


def test_non_utf8_bytes(tmp_path):
    body = (json.dumps(GOOD[0]) + "\n").encode() + b'{"id": "\xff"}\n'
    with pytest.raises(InputError) as err:
        _load(_file(tmp_path, body))
    assert err.value.line == 2 and "not UTF-8" in str(err.value)


def test_too_few_rows(tmp_path):
    path = _file(tmp_path, [json.dumps(GOOD[0])])
    with pytest.raises(InputError, match="fewer than the 5 required"):
        load_jsonl(path, FIELDS, max_chars=100, min_rows=5)


def test_shipped_data_is_what_the_generator_makes(tmp_path):
    """The shipped files are reproducible from the seeded generator, byte for byte."""
    shipped = USECASES_DIR / "dialogue_summarisation" / "data"
    for path in datagen.write(tmp_path):
        assert path.read_bytes() == (shipped / path.name).read_bytes(), path.name


def test_preference_pairs_differ_and_load(tmp_path):
    shipped = USECASES_DIR / "dialogue_summarisation" / "data" / "preferences_train.jsonl"
    split = load_jsonl(shipped, PREFERENCE_FIELDS, max_chars=4000)
    assert all(r["chosen"] != r["rejected"] for r in split.rows)
    assert len(split.rows) >= 300
