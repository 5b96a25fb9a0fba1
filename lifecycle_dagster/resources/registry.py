"""The MLflow model registry: a version per aligned model and per ONNX artifact, with aliases.

``candidate`` moves to every new version. ``champion`` moves when ``ml.promotion`` decides so: the
version passed evaluation and its primary metric beats the current champion's (recorded on each
version as ``metric.<name>``).
Versions point at the artifact store (``source``); serving resolves ``champion`` to that location.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlparse

from lifecycle_dagster.ml.promotion import Champion, Promotion, decide_promotion

CANDIDATE = "candidate"
CHAMPION = "champion"
LOGGED_MODEL_TAG = "logged_model_id"  # on a version: the MLflow logged model it registers
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # on a logged model: its registered versions


def registered_name(use_case: str, kind: str) -> str:
    """``<use case>-aligned`` (PyTorch weights) or ``<use case>-onnx`` (the deployable artifact)."""
    return f"{use_case}-{kind}"


class ModelRegistry:
    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def register(
        self,
        name: str,
        source: Path | str,
        *,
        run_id: str | None,
        tags: dict[str, str | float],
        description: str = "",
        model_id: str | None = None,
    ) -> str:
        """A new version of ``name`` pointing at ``source`` (and at the MLflow logged model
        ``model_id``: a version tag, and the logged model's list of versions); it becomes the
        ``candidate``."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description=description or None)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        uri = Path(source).resolve().as_uri() if isinstance(source, Path) else source
        if model_id:
            tags = {**tags, LOGGED_MODEL_TAG: model_id}
        version = self.client.create_model_version(
            name, source=uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()}
        ).version
        if model_id:  # the link MLflow's UI follows from the logged model to its versions
            model = self.client.get_logged_model(model_id)
            linked = json.loads(model.tags.get(MODEL_VERSIONS_TAG, "[]"))
            linked.append({"name": name, "version": str(version)})
            self.client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(linked)})
        self.client.set_registered_model_alias(name, CANDIDATE, version)
        return str(version)

    def by_alias(self, name: str, alias: str):
        """The model version behind ``alias``, or None (no such model or alias)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    def aliases(self, name: str) -> dict[str, str]:
        return {k: str(v) for k, v in self.client.get_registered_model(name).aliases.items()}

    def champion(self, name: str) -> Champion | None:
        """The champion version of ``name`` and its tags, or None."""
        current = self.by_alias(name, CHAMPION)
        return Champion(str(current.version), dict(current.tags)) if current is not None else None

    def promote(
        self,
        name: str,
        version: str,
        *,
        metric: str,
        value: float,
        passed: bool,
        blocked: str = "",
        tags: dict[str, str] | None = None,
        follow: Promotion | None = None,
    ) -> Promotion:
        """Apply ``decide_promotion`` to ``version``: record the decision and ``tags`` on the
        version, and move ``champion`` to it when promoted."""
        champion = self.champion(name)
        result = decide_promotion(
            name,
            str(version),
            champion,
            metric=metric,
            value=value,
            passed=passed,
            blocked=blocked,
            follow=follow,
        )
        if champion is not None and champion.version == str(version):
            return result
        for key, tag in {**(tags or {}), f"metric.{metric}": str(value)}.items():
            self.client.set_model_version_tag(name, version, key, str(tag))
        self.client.set_model_version_tag(name, version, "promotion", result.reason)
        if result.promoted:
            self.client.set_registered_model_alias(name, CHAMPION, version)
        return result


def local_path(source: str) -> Path:
    """The local folder behind a version's source (``file://`` or a plain path); other schemes
    (s3://, runs:/, models:/) are downloaded by MLflow into a temporary folder."""
    parsed = urlparse(source)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    if parsed.scheme == "s3":  # the artifact store's own objects: fetched through their manifest
        from lifecycle_dagster.resources.artifacts import resolve

        return resolve(source)
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
