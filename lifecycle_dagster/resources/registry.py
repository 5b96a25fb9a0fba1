"""The MLflow model registry: a version per aligned model and per ONNX artifact, with aliases.

``candidate`` moves to every new version. ``champion`` moves only when the version passed evaluation
and its primary metric beats the current champion's (recorded on each version as ``metric.<name>``).
Versions point at the artifact store (``source``); serving resolves ``champion`` to that location.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

CANDIDATE = "candidate"
CHAMPION = "champion"


def registered_name(use_case: str, kind: str) -> str:
    """``<use case>-aligned`` (PyTorch weights) or ``<use case>-onnx`` (the deployable artifact)."""
    return f"{use_case}-{kind}"


@dataclass
class Promotion:
    name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    value: float
    previous_version: str | None = None
    previous_value: float | None = None


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
    ) -> str:
        """A new version of ``name`` pointing at ``source``; it becomes the ``candidate``."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description=description or None)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        uri = Path(source).resolve().as_uri() if isinstance(source, Path) else source
        version = self.client.create_model_version(
            name, source=uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()}
        ).version
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

    def promote(
        self,
        name: str,
        version: str,
        *,
        metric: str,
        value: float,
        passed: bool,
        higher_is_better: bool = True,
        min_improvement: float = 0.0,
        blocked: str = "",
        tags: dict[str, str] | None = None,
        follow: Promotion | None = None,
    ) -> Promotion:
        """Make ``version`` the champion if it passed evaluation, nothing ``blocked`` it (a reason,
        e.g. a regression) and it beats the current champion on ``metric`` by more than
        ``min_improvement``; otherwise leave the champion where it is. ``tags`` go on the version.
        With ``follow``, the decision taken for another model is applied (the ONNX artifact follows
        the aligned model it was exported from, so both champions are the same model)."""
        current = self.by_alias(name, CHAMPION)
        previous_value = None
        if current is not None and f"metric.{metric}" in current.tags:
            previous_value = float(current.tags[f"metric.{metric}"])
        result = Promotion(
            name=name,
            version=version,
            promoted=False,
            reason="",
            metric=metric,
            value=value,
            previous_version=str(current.version) if current is not None else None,
            previous_value=previous_value,
        )
        if current is not None and str(current.version) == str(version):
            result.reason = f"v{version} is already the champion"
            return result
        if follow is not None:
            result.promoted = follow.promoted
            result.reason = f"follows {follow.name} v{follow.version}: {follow.reason}"
        elif not passed:
            result.reason = "evaluation did not pass"
        elif blocked:
            result.reason = blocked
        elif current is None:
            result.promoted, result.reason = True, "first champion"
        elif previous_value is None:
            result.promoted, result.reason = True, f"champion v{current.version} has no {metric}"
        else:
            gain = value - previous_value if higher_is_better else previous_value - value
            if gain > min_improvement:
                result.promoted = True
                result.reason = (
                    f"{metric} {value:.4f} beats champion v{current.version} ({previous_value:.4f})"
                )
            else:
                result.reason = (
                    f"{metric} {value:.4f} does not beat champion v{current.version} "
                    f"({previous_value:.4f})"
                )
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
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
