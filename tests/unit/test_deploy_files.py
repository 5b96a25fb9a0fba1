"""What `deploy/` ships, checked offline against the real schemas: the Kubernetes manifests against
Kubernetes' (kubernetes-validate), the compose file against the Compose Specification's
(as check-jsonschema vendors it), both Dagster instance files against Dagster's own instance
config schema, and the image and chart pins against what the package installs."""

import json
import re
import tomllib
from pathlib import Path

import dagster
import jsonschema
import kubernetes_validate
import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33.0"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", sorted((DEPLOY / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifests_validate_against_kubernetes_schemas(path):
    docs = documents(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "lifecycle-dagster", doc["kind"]


def test_no_secret_value_in_any_manifest():
    """Credentials come from Secrets created at install time, never from the repository."""
    for path in [*(DEPLOY / "k8s").glob("*.yaml"), DEPLOY / "helm" / "values.yaml"]:
        for doc in documents(path):
            assert doc.get("kind") != "Secret", path
        text = path.read_text()
        assert not re.search(r"(?i)(password|secret_access_key)\s*:\s*\S+", text), path


def test_compose_file_validates_against_the_compose_spec():
    import check_jsonschema

    schema_path = (
        Path(check_jsonschema.__file__).parent / "builtin_schemas/vendor/compose-spec.json"
    )
    schema = yaml.safe_load(schema_path.read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    jsonschema.validate(compose, schema)
    services = compose["services"]
    assert {
        "postgres",
        "minio",
        "mlflow",
        "code-server",
        "webserver",
        "daemon",
        "model-server",
    } <= set(services)
    for name, service in services.items():  # published on the host's loopback only
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        jsonschema.validate({**compose, "services": {"x": {"ports": [{}], "bogus": 1}}}, schema)


@pytest.mark.parametrize("path", [ROOT / "dagster.yaml", DEPLOY / "dagster.yaml"], ids=str)
def test_instance_configs_validate_against_dagster_and_keep_the_ui_quiet(
    path, tmp_path, monkeypatch
):
    for var in ("HOST", "PORT", "DB", "USERNAME", "PASSWORD"):
        monkeypatch.setenv(f"DAGSTER_PG_{var}", "5432" if var == "PORT" else "x")
    (tmp_path / "dagster.yaml").write_text(path.read_text())
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["telemetry"] == {"enabled": False}
    assert config["nux"] == {"enabled": False}  # no first-visit dialog over a fresh install
    assert config["run_monitoring"]["enabled"] is True
    assert config["concurrency"]["pools"]["default_limit"] == 1


def test_production_instance_keeps_everything_in_postgresql_with_credentials_from_env():
    config = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    storage = config["storage"]["custom"]  # dagster-postgres's, pool claims serialised
    assert (storage["module"], storage["class"]) == (
        "lifecycle_dagster.lib.pg_storage",
        "SerialClaimPostgresStorage",
    )
    db = storage["config"]["postgres_db"]
    for field in ("hostname", "port", "db_name", "username", "password"):
        assert set(db[field]) == {"env"}, field  # every connection field from the environment
    assert db["scheme"] == "postgresql+psycopg2"  # the driver dagster-postgres depends on
    assert config["run_retries"]["enabled"] is True


def test_image_and_chart_follow_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", dockerfile, flags=re.M):
        assert (ROOT / source).exists(), f"deploy/Dockerfile copies {source}, which is missing"
    extras = re.findall(r'pip install "\.\[(\w+)\]"', dockerfile)
    assert extras and set(extras) <= set(project["optional-dependencies"])
    assert re.search(r"^USER 10001$", dockerfile, flags=re.M)  # not root
    # The Helm chart's version is the dagster package's: they are upgraded together.
    values = (DEPLOY / "helm" / "values.yaml").read_text()
    (pinned,) = re.findall(r"dagster/dagster --version (\S+)", values)
    assert pinned.split(".")[:2] == dagster.__version__.split(".")[:2], (
        pinned,
        dagster.__version__,
    )


# The Kubernetes objects inside the Helm values, each against its Kubernetes definition (strict:
# no unknown field). The chart's own values.schema.json is not on this machine (deploy/README.md).
HELM_K8S_OBJECTS = {
    "dagsterWebserver.resources": "resourcerequirements",
    "dagster-user-deployments.deployments[].resources": "resourcerequirements",
    "dagster-user-deployments.deployments[].env[]": "envvar",
    "dagster-user-deployments.deployments[].envConfigMaps[]": "configmapenvsource",
    "dagster-user-deployments.deployments[].envSecrets[]": "secretenvsource",
    "runLauncher.config.k8sRunLauncher.envConfigMaps[]": "configmapenvsource",
    "runLauncher.config.k8sRunLauncher.envSecrets[]": "secretenvsource",
    "runLauncher.config.k8sRunLauncher.runK8sConfig.containerConfig.resources": "resourcerequirements",
}


def at(values, path: str) -> list:
    """The values at a dotted path, ``[]`` meaning each item of a list."""
    found = [values]
    for part in path.split("."):
        found = [v[part.removesuffix("[]")] for v in found]
        if part.endswith("[]"):
            found = [item for v in found for item in v]
    return found


def k8s_definition(name: str):
    from referencing import Registry, Resource

    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    folder /= f"v{K8S_VERSION}-local-strict"
    schema = json.loads((folder / f"{name}-v1.json").read_text())
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_kubernetes_objects_in_the_helm_values_validate_against_their_definitions():
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    for path, definition in HELM_K8S_OBJECTS.items():
        found = at(values, path)
        assert found, path
        for value in found:
            errors = [e.message for e in k8s_definition(definition).iter_errors(value)]
            assert not errors, (path, errors)
    # A misspelt field is caught, as the chart would pass it on to Kubernetes unchecked.
    assert list(k8s_definition("resourcerequirements").iter_errors({"limit": {"cpu": "1"}}))


CHART_SCHEMA = DEPLOY / "helm" / "chart" / "dagster" / "values.schema.json"


@pytest.mark.skipif(
    not CHART_SCHEMA.exists(),
    reason="the pinned chart is not here: `make helm-chart` (helm and its repository) pulls it",
)
def test_helm_values_validate_against_the_charts_own_schema():
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    schema = json.loads(CHART_SCHEMA.read_text())
    chart = yaml.safe_load((CHART_SCHEMA.parent / "Chart.yaml").read_text())
    (pinned,) = re.findall(
        r"dagster/dagster --version (\S+)", (DEPLOY / "helm" / "values.yaml").read_text()
    )
    assert chart["version"] == pinned, (chart["version"], pinned)
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(values)
    ]
    assert not errors, errors
