"""Artifacts on S3-compatible storage, against a real S3 server on loopback (moto in server mode):
what is written resolves byte for byte, an upload killed half way leaves nothing that resolves,
and Dagster assets read each other's artifacts through their object URIs."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import pytest
from servers import S3Server

from lifecycle_dagster.ml import objectstore
from lifecycle_dagster.ml.artifacts import MANIFEST, atomic_dir
from lifecycle_dagster.resources.artifacts import ArtifactStore, resolve

BUCKET = "lifecycle-artifacts"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1, with the environment boto3 reads pointed at it."""
    server = S3Server(tmp_path_factory.mktemp("moto"), bucket=BUCKET).start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        try:
            yield server
        finally:
            server.stop()


def keys(prefix: str) -> list[str]:
    pages = (
        objectstore.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    )
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def artifact(root: objectstore.S3Root, key: str, files: dict[str, bytes]) -> Path:
    local = root.local(key)
    with atomic_dir(local) as tmp:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
    return local


FILES = {"model/weights.safetensors": os.urandom(300_000), "model/config.json": b'{"a": 1}'}


def test_published_artifact_resolves_byte_for_byte_in_a_fresh_cache(s3_server, tmp_path):
    root = objectstore.S3Root.parse(f"s3://{BUCKET}/store", tmp_path / "writer")
    uri = objectstore.publish(root, artifact(root, "store/uc/sft_adapter/run1", FILES))
    assert uri == f"s3://{BUCKET}/store/uc/sft_adapter/run1"
    assert keys("store/uc/") == sorted(
        [f"store/uc/sft_adapter/run1/{r}" for r in FILES]
        + [f"store/uc/sft_adapter/run1/{MANIFEST}"]
    )
    assert keys("store/_staging/") == []  # the staging copies are gone
    local = objectstore.fetch(uri, tmp_path / "reader")  # another pod: nothing cached
    assert {r: (local / r).read_bytes() for r in FILES} == FILES


@pytest.mark.parametrize("phase", ["staged", "copied"])
def test_an_upload_killed_half_way_leaves_nothing_that_resolves(s3_server, tmp_path, phase):
    """The publishing process gets SIGKILL after its first file is staged (or copied into
    place): no manifest under the artifact's key, so no reader ever resolves it."""
    root = objectstore.S3Root.parse(f"s3://{BUCKET}/killed-{phase}", tmp_path / "writer")
    local = artifact(root, f"killed-{phase}/uc/aligned_model/run2", FILES)
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from lifecycle_dagster.ml import objectstore

        def die(phase, rel):
            if phase == {phase!r}:
                os.kill(os.getpid(), signal.SIGKILL)

        root = objectstore.S3Root.parse("s3://{BUCKET}/killed-{phase}", Path({str(root.cache)!r}))
        objectstore.publish(root, Path({str(local)!r}), on_file=die)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=120, env=os.environ.copy())
    assert done.returncode == -signal.SIGKILL
    uri = root.uri(f"killed-{phase}/uc/aligned_model/run2")
    written = keys(f"killed-{phase}/uc/")
    assert f"killed-{phase}/uc/aligned_model/run2/{MANIFEST}" not in written
    assert len(written) == (0 if phase == "staged" else 1)
    with pytest.raises(objectstore.IncompleteArtifactError, match="no MANIFEST.json"):
        objectstore.fetch(uri, tmp_path / "reader")
    assert not (tmp_path / "reader" / BUCKET / f"killed-{phase}/uc/aligned_model/run2").exists()


def test_an_object_that_differs_from_its_manifest_is_refused(s3_server, tmp_path):
    root = objectstore.S3Root.parse(f"s3://{BUCKET}/tampered", tmp_path / "writer")
    uri = objectstore.publish(root, artifact(root, "tampered/uc/onnx_model/run3", FILES))
    objectstore.client().put_object(
        Bucket=BUCKET, Key="tampered/uc/onnx_model/run3/model/config.json", Body=b'{"a": 2}'
    )
    with pytest.raises(objectstore.IncompleteArtifactError, match="hash differs"):
        objectstore.fetch(uri, tmp_path / "reader")
    assert list((tmp_path / "reader").rglob("*.json")) == []  # nothing half-downloaded kept


def test_assets_read_each_other_through_object_uris(s3_server, tmp_path, monkeypatch):
    """Two assets on an S3 store: the writer's materialization carries the object URI, the
    reader resolves it from a cleared cache; a writer that fails publishes nothing and the
    reader keeps resolving the last good artifact."""
    monkeypatch.setenv("LIFECYCLE_HOME", str(tmp_path / "home"))
    store = ArtifactStore(root=f"s3://{BUCKET}/assets")
    fail = {"now": False}

    @dg.asset
    def weights(context, artifact_store: ArtifactStore):
        target = artifact_store.target("weights", context.run.run_id)
        with artifact_store.write(target) as tmp:
            (tmp / "w.bin").write_bytes(b"version %d" % len(context.run.run_id))
            if fail["now"]:
                raise RuntimeError("training diverged")
        return dg.MaterializeResult(
            metadata={"artifact_path": dg.MetadataValue.path(artifact_store.location(target))}
        )

    @dg.asset(deps=[weights])
    def reader(context, artifact_store: ArtifactStore):
        path = artifact_store.upstream(context, "weights")
        return dg.MaterializeResult(metadata={"read": (path / "w.bin").read_text()})

    instance = dg.DagsterInstance.ephemeral()
    resources = {"artifact_store": store}
    first = dg.materialize([weights, reader], instance=instance, resources=resources)
    uri = first.asset_materializations_for_node("weights")[0].metadata["artifact_path"].value
    assert uri.startswith(f"s3://{BUCKET}/assets/weights/")
    published = keys("assets/weights/")

    fail["now"] = True
    failed = dg.materialize([weights], instance=instance, resources=resources, raise_on_error=False)
    assert not failed.success
    assert keys("assets/weights/") == published  # nothing of the failed run was published

    import shutil

    shutil.rmtree(tmp_path / "home" / "cache")  # a fresh pod: only the object store remains
    again = dg.materialize(
        [weights, reader], instance=instance, resources=resources, selection=[reader]
    )
    read = again.asset_materializations_for_node("reader")[0].metadata["read"].value
    assert read == "version 36"
    assert resolve(uri).is_dir()


def test_a_tracking_server_with_a_local_store_stops_before_any_training(tmp_path):
    """An MLflow server refuses local paths as model version sources: that deployment is
    refused as each stage opens, naming the setting to change."""
    from lifecycle_dagster.lib.stage import check_registry_reach
    from lifecycle_dagster.resources.mlflow import MlflowTracking

    server = MlflowTracking(tracking_uri="http://user:s3cret@mlflow.internal:5000")
    with pytest.raises(dg.Failure, match="set LIFECYCLE_ARTIFACT_ROOT to object storage") as err:
        check_registry_reach(ArtifactStore(root=str(tmp_path)), server)
    assert "s3cret" not in str(err.value) and "http://mlflow.internal:5000" in str(err.value)
    check_registry_reach(ArtifactStore(root=f"s3://{BUCKET}/x"), server)
    check_registry_reach(
        ArtifactStore(root=str(tmp_path)), MlflowTracking(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    )
