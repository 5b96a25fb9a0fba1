"""Which dataset snapshots a use case's source files no longer match (the data sensor's question)."""

import json
from pathlib import Path

import dagster as dg

from lifecycle_dagster.ml.artifacts import file_sha256, read_manifest
from lifecycle_dagster.ml.errors import InputError
from lifecycle_dagster.ml.objectstore import IncompleteArtifactError
from lifecycle_dagster.ml.retrieval import INDEX_FILE, index_settings, load_documents
from lifecycle_dagster.ml.retrieval import digest as documents_digest
from lifecycle_dagster.ml.usecase import UseCase
from lifecycle_dagster.resources.artifacts import resolve, select_record

# The files each dataset asset snapshots: use-case data field -> its copy inside the artifact.
DATA_FILES = {
    "task_dataset": {"train": "source/train", "eval": "source/eval"},
    "preference_dataset": {
        "preferences_train": "source/preferences_train",
        "preferences_eval": "source/preferences_eval",
    },
}


def materialized_use_case(instance: dg.DagsterInstance, partition: str) -> UseCase | None:
    """The use case as its partition's latest ``use_case`` materialization resolved it."""
    record = select_record(instance, "use_case", use_case=partition)
    try:
        path = resolve(str(record.asset_materialization.metadata["artifact_path"].value))
        return UseCase.model_validate_json((path / "use_case.json").read_text())
    except (AttributeError, KeyError, OSError, ValueError, IncompleteArtifactError):
        return None


def changed_datasets(
    instance: dg.DagsterInstance, hashes: dict, use_case: str
) -> tuple[list[str], list[str]]:
    """Dataset assets of ``use_case`` (a partition) whose source files no longer match their
    latest snapshot, and why.

    ``hashes`` caches file digests by (size, mtime) so a tick re-reads only files that moved."""
    uc = materialized_use_case(instance, use_case)
    if uc is None:
        return [], []
    changed, why = [], []
    for asset, files in DATA_FILES.items():
        record = select_record(instance, asset, use_case=use_case)
        try:
            snapshot = resolve(str(record.asset_materialization.metadata["artifact_path"].value))
            manifest = read_manifest(snapshot)["files"]
        except (AttributeError, KeyError, OSError, ValueError, IncompleteArtifactError):
            continue  # never materialized, or its snapshot is gone: nothing to compare with
        for field, name in files.items():
            source = uc.data.files().get(field)
            if source is None or not source.is_file() or name not in manifest:
                continue
            stat = source.stat()
            key = f"{source}:{stat.st_size}:{stat.st_mtime_ns}"
            digest = hashes.get(key) or file_sha256(source)
            hashes[key] = digest
            if digest != manifest[name]["sha256"]:
                changed.append(asset)
                why.append(
                    f"{source.name} changed (sha256 {digest[:12]}, snapshot {record.storage_id})"
                )
                break
    index = changed_index(instance, hashes, use_case, uc)
    if index:  # the rows' passages come from the index: the task data is re-made with it
        changed = list(dict.fromkeys(["knowledge_index", "task_dataset", *changed]))
        why.append(index)
    return changed, why


def changed_index(instance: dg.DagsterInstance, hashes: dict, use_case: str, uc: UseCase) -> str:
    """Why the use case's retrieval documents no longer match its latest index ('' if they do,
    or it has none). The documents' digest is cached by their names, sizes and times."""
    spec = uc.retrieval
    record = select_record(instance, "knowledge_index", use_case=use_case)
    if not spec.enabled or record is None or not Path(spec.documents).exists():
        return ""
    try:
        index = resolve(str(record.asset_materialization.metadata["artifact_path"].value))
        built = json.loads((index / INDEX_FILE).read_text()).get("digest")
    except (AttributeError, KeyError, OSError, ValueError, IncompleteArtifactError):
        return ""
    files = [spec.documents] if spec.documents.is_file() else sorted(spec.documents.rglob("*"))
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    key = "docs:" + json.dumps([index_settings(spec), stats], sort_keys=True)
    try:
        now = hashes.get(key) or documents_digest(load_documents(spec.documents), spec)
    except InputError as e:
        return f"documents unreadable: {e}"
    hashes[key] = now
    if now == built:
        return ""
    return f"{spec.documents.name} changed (documents {now[:12]}, index {record.storage_id})"
