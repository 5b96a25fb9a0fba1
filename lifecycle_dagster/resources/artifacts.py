"""The artifact store: model artifacts live here, never in Dagster's pickling IO manager.

Each materialization writes a new directory atomically (see ``ml.artifacts.atomic_dir``). Downstream
assets find their inputs through the upstream asset's latest materialization metadata
(``artifact_path``), so a failed run leaves the last good artifact as the one in use.

The store is a local folder by default, or S3-compatible object storage when its root is an
``s3://`` URI (``ml.objectstore``): artifacts are still written locally first, then published with
their manifest last, and ``artifact_path`` is the object's URI, which any pod can resolve.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from pydantic import Field

from lifecycle_dagster import settings
from lifecycle_dagster.ml import objectstore
from lifecycle_dagster.ml.artifacts import atomic_dir, check_sizes

PATH_KEY = "artifact_path"
USABLE_KEY = "usable"


class MissingUpstreamError(RuntimeError):
    pass


class ArtifactStore(dg.ConfigurableResource):
    """A local folder (the default) or an ``s3://bucket/prefix`` on S3-compatible storage."""

    root: str = Field(
        default="",
        description="Store root: a folder, or s3://bucket/prefix; '' = artifacts/ under the state "
        "dir.",
    )

    def _remote(self) -> objectstore.S3Root | None:
        if objectstore.is_remote(self.root):
            return objectstore.S3Root.parse(self.root, settings.object_cache())
        return None

    @property
    def on_object_storage(self) -> bool:
        return self._remote() is not None

    def _root(self) -> Path:
        remote = self._remote()
        if remote is not None:
            return remote.local(remote.key())
        return Path(self.root) if self.root else settings.artifacts_root()

    def target(self, asset: str, run_id: str, use_case: str | None = None) -> Path:
        """Where one materialization of ``asset`` is written: a new directory per run, under its
        use case (the asset's partition) when it has one. With an object store, the local folder
        that mirrors its key."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        root = self._root() / use_case if use_case else self._root()
        return root / asset / f"{stamp}-{run_id[:8]}"

    @contextlib.contextmanager
    def write(self, target: Path, extra: dict | None = None) -> Iterator[Path]:
        """A temp directory that becomes ``target`` only when the body succeeds (and, with an
        object store, only once it is published there, manifest last)."""
        with atomic_dir(target, extra) as tmp:
            yield tmp
        remote = self._remote()
        if remote is not None:
            try:
                objectstore.publish(remote, target)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise

    def location(self, target: Path) -> str:
        """Where readers find the artifact written at ``target``: its path, or its object URI."""
        remote = self._remote()
        return remote.uri(remote.key_of(target)) if remote is not None else str(target)

    def upstream(self, context, asset: str) -> Path:
        """The artifact of ``asset`` this materialization reads: this run's, else the newest
        usable one, of the same use case (partition)."""
        return self.latest(context.instance, asset, context.run.run_id, use_case_key(context))

    def latest(
        self,
        instance: dg.DagsterInstance,
        asset: str,
        run_id: str | None = None,
        use_case: str | None = None,
    ) -> Path:
        """The artifact ``asset`` consumers should use, checked for completeness.

        That is the one this run materialized, if any; else the newest materialization whose
        blocking checks passed (``usable``), so an artifact that failed its gate never feeds a
        later run and the last good one stays in use. With ``use_case``, only that partition's.
        """
        where = f" for use case '{use_case}'" if use_case else ""
        records = records_of(instance, asset, use_case)
        if not records:
            raise MissingUpstreamError(
                f"'{asset}' has never been materialized{where}; materialize it (or the whole "
                "lifecycle) first"
            )
        chosen = _choose(records, run_id)
        if chosen is None:
            raise MissingUpstreamError(
                f"no usable materialization of '{asset}'{where}: the recent ones failed a "
                "blocking check"
            )
        meta = chosen.asset_materialization.metadata
        if PATH_KEY not in meta:
            raise MissingUpstreamError(f"'{asset}' materialization carries no {PATH_KEY}")
        return resolve(str(meta[PATH_KEY].value))


def resolve(location: str) -> Path:
    """The local folder of the artifact at ``location`` (a path, or an object URI fetched into
    the cache), checked against its manifest: raises if it is incomplete, gone or truncated."""
    path = objectstore.local_copy(location)
    check_sizes(path)
    return path


def records_of(instance: dg.DagsterInstance, asset: str, use_case: str | None, limit: int = 50):
    """The newest materializations of ``asset``, of one use case (partition) when given."""
    key = dg.AssetKey(asset)
    where = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[use_case]) if use_case else key
    return instance.fetch_materializations(where, limit=limit).records


def select_record(
    instance: dg.DagsterInstance,
    asset: str,
    run_id: str | None = None,
    use_case: str | None = None,
):
    """This run's materialization of ``asset`` if any, else the newest usable one (or None)."""
    return _choose(records_of(instance, asset, use_case), run_id)


def _choose(records, run_id: str | None):
    chosen = next((r for r in records if run_id and r.run_id == run_id), None)
    return chosen or next((r for r in records if _usable(r)), None)


def _usable(record) -> bool:
    meta = record.asset_materialization.metadata
    return USABLE_KEY not in meta or bool(meta[USABLE_KEY].value)


def use_case_key(context) -> str | None:
    """The use case this materialization belongs to: its partition key. A partitioned asset run
    without one is refused: it would read the newest artifacts of any use case."""
    if context.has_partition_key:
        return context.partition_key
    assets_def = getattr(context, "assets_def", None)
    if assets_def is not None and assets_def.partitions_def is not None:
        raise dg.Failure(
            f"{context.asset_key.to_user_string()}: this run has no use case; launch it for the "
            f"use case's partition (`lifecycle run` adds it, or pick one in the UI)"
        )
    return None


def upstream_metadata(context, asset: str) -> dict:
    """Metadata of the materialization ``ArtifactStore.upstream`` resolves (this run's, else the
    newest usable one)."""
    return _metadata(
        select_record(context.instance, asset, context.run.run_id, use_case_key(context))
    )


def newest_metadata(context, asset: str) -> dict:
    """Metadata of this run's materialization of ``asset``, else of the newest one, usable or not
    (a gate reads the latest verdict, not the last good one)."""
    records = records_of(context.instance, asset, use_case_key(context))
    record = next((r for r in records if r.run_id == context.run.run_id), None)
    return _metadata(record or (records[0] if records else None))


def _metadata(record) -> dict:
    if record is None:
        return {}
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}
