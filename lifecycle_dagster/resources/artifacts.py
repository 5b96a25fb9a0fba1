"""The artifact store: model artifacts live here, never in Dagster's pickling IO manager.

Each materialization writes a new directory atomically (see ``ml.artifacts.atomic_dir``). Downstream
assets find their inputs through the upstream asset's latest materialization metadata
(``artifact_path``), so a failed run leaves the last good artifact as the one in use.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from pydantic import Field

from lifecycle_dagster import settings
from lifecycle_dagster.ml.artifacts import atomic_dir, read_manifest

PATH_KEY = "artifact_path"


class MissingUpstreamError(RuntimeError):
    pass


class ArtifactStore(dg.ConfigurableResource):
    """Local filesystem store (production swaps the root for a mounted bucket or volume)."""

    root: str = Field(default="", description="Store root; '' = artifacts/ under the state dir.")

    def _root(self) -> Path:
        return Path(self.root) if self.root else settings.artifacts_root()

    def target(self, asset: str, run_id: str) -> Path:
        """Where one materialization of ``asset`` goes (a new directory per run)."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        return self._root() / asset / f"{stamp}-{run_id[:8]}"

    @contextlib.contextmanager
    def write(self, target: Path, extra: dict | None = None) -> Iterator[Path]:
        """A temp directory that becomes ``target`` only when the body succeeds."""
        with atomic_dir(target, extra) as tmp:
            yield tmp

    def latest(self, instance: dg.DagsterInstance, asset: str) -> Path:
        """The artifact of ``asset``'s latest materialization, checked for completeness."""
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        if event is None or event.asset_materialization is None:
            raise MissingUpstreamError(
                f"'{asset}' has never been materialized; materialize it (or the whole lifecycle) "
                "first"
            )
        meta = event.asset_materialization.metadata
        if PATH_KEY not in meta:
            raise MissingUpstreamError(f"'{asset}' materialization carries no {PATH_KEY}")
        path = Path(meta[PATH_KEY].value)
        read_manifest(path)  # raises if the directory is incomplete or gone
        return path
