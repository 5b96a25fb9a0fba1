"""Artifacts on S3-compatible object storage, with the local store's guarantees.

An artifact is first written locally as ever (``ml.artifacts.atomic_dir``: a complete directory
with its manifest of hashes). Publishing uploads its files under a temporary prefix
(``<root>/_staging/<uuid>/``), copies them to the artifact's key on the server, writes the manifest
there last and deletes the staging objects. A reader resolves an artifact only through its
manifest and downloads into a local cache, checking every file's hash; an upload killed half way
leaves either nothing under the artifact's key or files without a manifest, and neither resolves.

The client is boto3's: credentials from its usual chain (``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, a profile, the pod's role), the endpoint of an S3-compatible server
from ``AWS_ENDPOINT_URL`` (or ``MLFLOW_S3_ENDPOINT_URL``, which MLflow reads for the same server).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from lifecycle_dagster.ml.artifacts import MANIFEST, check_sizes, file_sha256, read_manifest

SCHEME = "s3://"
STAGING = "_staging"
STALE_STAGING_S = 24 * 3600  # staging objects older than this are from uploads that died


class IncompleteArtifactError(RuntimeError):
    """The artifact at a URI has no manifest, or its objects do not match it."""


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(SCHEME)


@dataclass(frozen=True)
class S3Root:
    """``s3://bucket/prefix``: where artifacts go, and their local cache."""

    bucket: str
    prefix: str
    cache: Path

    @classmethod
    def parse(cls, uri: str, cache: Path) -> S3Root:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"{uri!r}: an object-store root is s3://<bucket>[/<prefix>]")
        return cls(parsed.netloc, parsed.path.strip("/"), Path(cache))

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def local(self, key: str) -> Path:
        """The cache folder that mirrors ``key``."""
        return self.cache / self.bucket / key

    def uri(self, key: str) -> str:
        return f"{SCHEME}{self.bucket}/{key}"

    def key_of(self, local: Path) -> str:
        return Path(local).resolve().relative_to((self.cache / self.bucket).resolve()).as_posix()


def client():
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint or None)


def publish(
    root: S3Root,
    local: Path,
    s3=None,
    on_file: Callable[[str, str], None] = lambda phase, rel: None,
) -> str:
    """Upload the complete local artifact ``local`` (a folder under ``root``'s cache, manifest
    included) to its key: files to a staging prefix, then copied into place, manifest last.
    Returns the artifact's URI. ``on_file(phase, rel)`` follows progress: "staged" when a file
    reached the staging prefix, "copied" when it reached the artifact's key."""
    s3 = s3 or client()
    manifest = read_manifest(local)  # only complete artifacts are published
    key = root.key_of(local)
    staging = root.key(STAGING, uuid.uuid4().hex)
    _drop_stale_staging(root, s3)
    try:
        for rel in manifest["files"]:
            s3.upload_file(str(local / rel), root.bucket, f"{staging}/{rel}")
            on_file("staged", rel)
        for rel in manifest["files"]:
            s3.copy({"Bucket": root.bucket, "Key": f"{staging}/{rel}"}, root.bucket, f"{key}/{rel}")
            on_file("copied", rel)
        s3.upload_file(str(local / MANIFEST), root.bucket, f"{key}/{MANIFEST}")
    finally:
        _delete_prefix(s3, root.bucket, staging + "/")
    return root.uri(key)


def fetch(uri: str, cache: Path, s3=None) -> Path:
    """The local copy of the artifact at ``uri``: from the cache when complete there, else
    downloaded through its manifest with every file's hash checked. Raises
    ``IncompleteArtifactError`` when the artifact has no manifest or does not match it."""
    root = S3Root.parse(uri, cache)
    key = root.key()  # the URI's path is the artifact's key
    local = root.local(key)
    if (local / MANIFEST).is_file():
        try:
            check_sizes(local)
            return local
        except ValueError:
            shutil.rmtree(local, ignore_errors=True)  # a damaged cache entry: download again
    s3 = s3 or client()
    try:
        body = s3.get_object(Bucket=root.bucket, Key=f"{key}/{MANIFEST}")["Body"].read()
    except s3.exceptions.NoSuchKey as exc:
        raise IncompleteArtifactError(
            f"{uri}: no {MANIFEST}; the upload never finished, so the artifact is not usable"
        ) from exc
    manifest = json.loads(body)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.parent / f".tmp-{local.name}-{uuid.uuid4().hex[:8]}"
    try:
        for rel, info in manifest["files"].items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                s3.download_file(root.bucket, f"{key}/{rel}", str(path))
            except Exception as exc:
                raise IncompleteArtifactError(f"{uri}/{rel}: listed in {MANIFEST}, {exc}") from exc
            if file_sha256(path) != info["sha256"]:
                raise IncompleteArtifactError(f"{uri}/{rel}: hash differs from {MANIFEST}")
        (tmp / MANIFEST).write_bytes(body)
        if local.exists():
            shutil.rmtree(local)
        os.replace(tmp, local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def _delete_prefix(s3, bucket: str, prefix: str) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def _drop_stale_staging(root: S3Root, s3) -> None:
    """Staging objects of uploads that died (older than a day) are removed."""
    cutoff = time.time() - STALE_STAGING_S
    stale = []
    prefix = root.key(STAGING) + "/"
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=root.bucket, Prefix=prefix):
        stale += [
            {"Key": o["Key"]}
            for o in page.get("Contents", [])
            if o["LastModified"].timestamp() < cutoff
        ]
    for i in range(0, len(stale), 1000):
        s3.delete_objects(
            Bucket=root.bucket, Delete={"Objects": stale[i : i + 1000], "Quiet": True}
        )


def local_copy(location: str | Path) -> Path:
    """The local folder of an artifact at ``location``: the path itself, or the object URI
    fetched (through its manifest) into the state dir's object cache."""
    if is_remote(location):
        from lifecycle_dagster import settings

        return fetch(str(location), settings.object_cache())
    return Path(location)
