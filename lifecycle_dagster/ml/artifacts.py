"""Atomic artifact directories: written into a temp dir, renamed into place, manifest written last.

A reader trusts a directory only when its manifest exists and its hashes match; a run that fails half
way leaves no directory behind, so the previous artifact stays the latest good one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "MANIFEST.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(root: Path, extra: dict | None = None) -> dict:
    files = {
        str(p.relative_to(root)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {
        "version": digest[:16],
        "sha256": digest,
        "files": files,
        "created_at": time.time(),
        **(extra or {}),
    }


@contextlib.contextmanager
def atomic_dir(final: Path, extra: dict | None = None) -> Iterator[Path]:
    """Yield a temp dir next to ``final``; on success add the manifest and rename it into place.

    On any exception the temp dir is removed and ``final`` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        manifest = build_manifest(tmp, extra)
        (tmp / (MANIFEST + ".part")).write_text(json.dumps(manifest, indent=2))
        os.replace(tmp / (MANIFEST + ".part"), tmp / MANIFEST)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{root}: no {MANIFEST}; the artifact is incomplete")
    return json.loads(path.read_text())


def verify(root: Path) -> dict:
    """The manifest, after checking every listed file's hash."""
    manifest = read_manifest(root)
    for rel, info in manifest["files"].items():
        if file_sha256(Path(root) / rel) != info["sha256"]:
            raise ValueError(f"{Path(root) / rel}: hash differs from the manifest")
    return manifest


def check_sizes(root: Path) -> dict:
    """The manifest, after a cheap check that every listed file exists with its size."""
    manifest = read_manifest(root)
    for rel, info in manifest["files"].items():
        path = Path(root) / rel
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            raise ValueError(f"{path}: missing or not the size the manifest records")
    return manifest
