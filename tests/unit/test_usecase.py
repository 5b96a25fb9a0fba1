"""The use case and profile loader: valid input resolves, bad input names file, line and field."""

from pathlib import Path

import pytest

from lifecycle_dagster.ml.errors import InputError
from lifecycle_dagster.ml.usecase import USECASES_DIR
from lifecycle_dagster.ml.usecase_loader import load_use_case

BASE = USECASES_DIR / "dialogue_summarisation" / "usecase.yaml"


def test_tiny_profile_resolves_data_paths_and_overrides(use_case):
    assert use_case.name == "dialogue_summarisation"
    assert use_case.base_model.source == "scratch"
    assert use_case.data.train.is_absolute() and use_case.data.train.exists()
    assert use_case.evaluation.thresholds["rouge_l"].min == 0.2
    assert use_case.readaptation.ladder[-1].adaptation.method == "full"


def test_layered_file_and_overrides_win(tmp_path):
    layer = tmp_path / "layer.yaml"
    layer.write_text("adaptation:\n  method: full\n  max_steps: 7\n")
    uc = load_use_case(layer, profile="tiny", overrides={"adaptation": {"max_steps": 9}})
    assert uc.adaptation.method == "full"
    assert uc.adaptation.max_steps == 9


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "usecase.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _valid_text() -> str:
    text = BASE.read_text()
    return text.replace("data/", str(BASE.parent / "data") + "/")


def test_missing_field_names_file_and_field(tmp_path):
    text = "\n".join(ln for ln in _valid_text().splitlines() if not ln.startswith("name:"))
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_use_case(path)
    assert err.value.path == str(path)
    assert err.value.field == "name"
    assert "Field required" in str(err.value)


def test_wrong_type_names_line_and_field(tmp_path):
    text = _valid_text().replace("max_steps: 60", "max_steps: many", 1)
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_use_case(path)
    expected_line = next(i for i, ln in enumerate(text.splitlines(), 1) if "max_steps: many" in ln)
    assert err.value.field == "adaptation.max_steps"
    assert err.value.line == expected_line
    assert f"{path}:{expected_line}" in str(err.value)


def test_unknown_field_is_rejected(tmp_path):
    path = _write(tmp_path, _valid_text() + "\nadaptaton_typo: 1\n")
    with pytest.raises(InputError) as err:
        load_use_case(path)
    assert err.value.field == "adaptaton_typo"


def test_empty_file(tmp_path):
    path = _write(tmp_path, "  \n")
    with pytest.raises(InputError, match="file is empty"):
        load_use_case(path)


def test_non_utf8_names_the_line(tmp_path):
    path = _write(tmp_path, b"name: x\ndescription: caf\xe9\n")
    with pytest.raises(InputError) as err:
        load_use_case(path)
    assert err.value.line == 2
    assert "not UTF-8" in str(err.value)


def test_invalid_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "name: x\ntask: [unclosed\n")
    with pytest.raises(InputError) as err:
        load_use_case(path)
    assert err.value.line is not None and "invalid YAML" in str(err.value)


def test_unknown_model_path_names_field(tmp_path):
    text = _valid_text().replace(
        "source: scratch", f"source: local\n  path: {tmp_path / 'nowhere'}"
    )
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_use_case(path)
    assert err.value.field == "base_model.path"
    assert "no HF model directory" in str(err.value)


def test_missing_data_file_names_field(tmp_path):
    text = _valid_text().replace("eval.jsonl", "missing.jsonl", 1)
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_use_case(path)
    assert err.value.field == "data.eval"


def test_unknown_profile():
    with pytest.raises(InputError, match="unknown profile 'nope'"):
        load_use_case(profile="nope")


def test_the_use_case_climbs_the_lifecycle_ladder():
    """Without a profile the use case starts at prompt tuning and climbs to LoRA, then full
    fine-tuning; each rung reaches the adaptation step's settings as the run config carries it."""
    from lifecycle_dagster.lib.configs import SFTAdapterConfig
    from lifecycle_dagster.ml.readaptation import next_attempt
    from lifecycle_dagster.ml.tunables import given

    uc = load_use_case(BASE)
    first = uc.adaptation.updated(SFTAdapterConfig())
    assert first.method == "prompt_tuning" and first.num_virtual_tokens == 16
    methods = [first.method]
    current = first
    for attempt in range(1, uc.readaptation.max_attempts):
        escalation, why = next_attempt(uc, attempt, current, elapsed_minutes=0)
        assert escalation is not None, why
        current = uc.adaptation.updated(SFTAdapterConfig(**given(escalation.adaptation)))
        methods.append(current.method)
    assert methods == ["prompt_tuning", "lora", "lora", "full"]
    assert [s.adaptation.learning_rate for s in uc.readaptation.ladder] == [0.002, 0.002, 0.0001]


def test_an_unknown_method_in_run_config_is_refused_by_name(use_case):
    from lifecycle_dagster.lib.configs import SFTAdapterConfig

    with pytest.raises(ValueError, match="method") as err:
        use_case.adaptation.updated(SFTAdapterConfig(method="qlora"))
    assert "'prompt_tuning', 'lora' or 'full'" in str(err.value)


def test_a_rung_that_changes_method_must_bring_its_learning_rate():
    # Rungs apply over `adaptation`, not over one another: the second rung is refused too.
    ladder = [
        {"adaptation": {"method": "lora", "learning_rate": 0.002}},
        {"adaptation": {"method": "lora", "lora_r": 16}},
    ]
    with pytest.raises(InputError, match=r"ladder.1 trains lora without a learning_rate"):
        load_use_case(BASE, overrides={"readaptation": {"ladder": ladder}})
    with pytest.raises(InputError, match=r"ladder.1 trains full without a learning_rate"):
        load_use_case(
            profile="tiny",
            overrides={"readaptation": {"ladder": [{}, {"adaptation": {"method": "full"}}]}},
        )
    uc = load_use_case(
        BASE, overrides={"readaptation": {"ladder": [{"adaptation": {"max_steps": 90}}]}}
    )
    assert uc.readaptation.ladder[0].adaptation.learning_rate is None  # same method: inherits


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"config.json": "{}", "pytorch_model.bin": "x"}, "only as pickled pytorch_model.bin"),
        ({"config.json": "{}"}, "no safetensors weights"),
        ({"config.json": "{}", "model.safetensors": "x"}, "no tokenizer"),
    ],
)
def test_a_model_directory_that_cannot_load_safely_is_refused_first(tmp_path, files, message):
    model = tmp_path / "model"
    model.mkdir()
    for name, content in files.items():
        (model / name).write_text(content)
    text = _valid_text().replace("source: scratch", f"source: local\n  path: {model}")
    with pytest.raises(InputError) as err:
        load_use_case(_write(tmp_path, text))
    assert err.value.field == "base_model.path" and message in str(err.value)


def test_a_file_that_is_not_gguf_is_refused_first(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("<html>not a model</html>")
    text = _valid_text().replace("source: scratch", f"source: gguf\n  path: {fake}")
    with pytest.raises(InputError) as err:
        load_use_case(_write(tmp_path, text))
    assert err.value.field == "base_model.path" and "is not a GGUF file" in str(err.value)
