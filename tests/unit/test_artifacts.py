"""Atomic artifact directories: complete or absent, never half-written."""

import pytest

from lifecycle_dagster.ml.artifacts import MANIFEST, atomic_dir, read_manifest, verify


def test_success_renames_into_place_with_manifest(tmp_path):
    final = tmp_path / "store" / "a1"
    with atomic_dir(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"abc")
        assert not final.exists()
    manifest = verify(final)
    assert set(manifest["files"]) == {"weights.bin"}
    assert len(manifest["version"]) == 16


def test_failure_leaves_nothing_and_keeps_previous(tmp_path):
    final = tmp_path / "store" / "a1"
    with atomic_dir(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"good")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "store" / "a2") as tmp:
        (tmp / "weights.bin").write_bytes(b"half")
        raise RuntimeError("training crashed")
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["a1"]
    assert (final / "weights.bin").read_bytes() == b"good"


def test_tampered_file_is_detected(tmp_path):
    final = tmp_path / "a"
    with atomic_dir(final) as tmp:
        (tmp / "w").write_bytes(b"1")
    (final / "w").write_bytes(b"2")
    with pytest.raises(ValueError, match="hash differs"):
        verify(final)


def test_directory_without_manifest_is_incomplete(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match=MANIFEST):
        read_manifest(tmp_path / "x")
