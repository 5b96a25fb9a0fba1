"""The MLflow registry on a temporary sqlite store: candidate on every version, champion only when
evaluation passed and the version beats the current champion."""

from lifecycle_dagster.resources.registry import ModelRegistry, local_path


def test_candidate_moves_every_time_and_champion_only_when_beaten(tmp_path):
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = "uc-onnx"

    def register(i: int) -> str:
        folder = tmp_path / f"artifact{i}"
        folder.mkdir()
        return registry.register(name, folder, run_id=None, tags={"i": i})

    v1 = register(1)
    first = registry.promote(name, v1, metric="rouge_l", value=0.50, passed=True)
    assert first.promoted and first.reason == "first champion"
    assert registry.aliases(name) == {"candidate": v1, "champion": v1}

    v2 = register(2)
    worse = registry.promote(name, v2, metric="rouge_l", value=0.45, passed=True)
    assert not worse.promoted and "does not beat champion v1" in worse.reason
    assert registry.aliases(name) == {"candidate": v2, "champion": v1}

    v3 = register(3)
    failed = registry.promote(name, v3, metric="rouge_l", value=0.90, passed=False)
    assert not failed.promoted and failed.reason == "evaluation did not pass"
    assert registry.aliases(name) == {"candidate": v3, "champion": v1}

    v4 = register(4)
    better = registry.promote(name, v4, metric="rouge_l", value=0.55, passed=True)
    assert better.promoted and better.previous_version == v1 and better.previous_value == 0.5
    assert registry.aliases(name) == {"candidate": v4, "champion": v4}
    champion = registry.by_alias(name, "champion")
    assert local_path(champion.source) == (tmp_path / "artifact4").resolve()
    assert champion.tags["metric.rouge_l"] == "0.55"
    assert registry.by_alias("no-such-model", "champion") is None
