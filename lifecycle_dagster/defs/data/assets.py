"""Data: the task's train/eval splits and the preference pairs, validated and snapshotted, and the
index retrieval searches. Each dataset artifact holds the rows every later stage reads (targets as
the task kind trains on them, with the passages retrieval found for each input) and, under
``source/``, the files they came from, which the data sensor compares with the files now."""

import json
import shutil

import dagster as dg

from lifecycle_dagster import settings
from lifecycle_dagster.lib.partitions import OWNERS, USE_CASES, use_case_check
from lifecycle_dagster.lib.render import table
from lifecycle_dagster.lib.results import check
from lifecycle_dagster.lib.stage import stage
from lifecycle_dagster.ml.artifacts import file_sha256
from lifecycle_dagster.ml.data import (
    build_pairs,
    check_token_lengths,
    describe_split,
    near_duplicates,
    overlap,
    validate_data,
    write_rows,
)
from lifecycle_dagster.ml.feedback import feedback_pairs
from lifecycle_dagster.ml.retrieval import (
    INDEX_DIR,
    INDEX_FILE,
    RETRIEVAL_FILE,
    Retriever,
    attach_passages,
    build_index,
    chunk,
    load_documents,
    recall_at_k,
)
from lifecycle_dagster.resources.artifacts import ArtifactStore
from lifecycle_dagster.resources.mlflow import MlflowTracking

BUILT = "built from the task data (reference vs another row's)"
SPLITS = ("train", "eval")


def snapshot(split, tmp, name: str, field: str) -> None:
    """Write a validated split's rows as ``name`` and copy its source (a file, or a save_to_disk
    directory) to ``source/<field>``, refusing it if it changed since it was validated."""
    write_rows(tmp / name, split.rows)
    (tmp / "source").mkdir(exist_ok=True)
    copy = tmp / "source" / field
    if split.path.is_dir():
        shutil.copytree(split.path, copy, ignore=shutil.ignore_patterns("*.lock"))
        return
    shutil.copy(split.path, copy)
    if file_sha256(copy) != split.sha256:
        raise dg.Failure(f"{split.path} changed while it was being validated; run again")


@dg.asset(
    group_name="data",
    partitions_def=USE_CASES,
    kinds={"bm25", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["use_case"],
)
def knowledge_index(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    """The use case's documents chunked and indexed for retrieval (BM25, or dense embeddings),
    versioned by their digest; the data sensor rebuilds it when a document changes. A use case
    without ``retrieval`` records that it has none, and its prompts stay as they are."""
    with stage(context, "knowledge_index", artifact_store, mlflow_tracking) as st:
        spec = st.use_case.retrieval
        if not spec.enabled:
            with st.write() as tmp:
                (tmp / INDEX_FILE).write_text(json.dumps({"method": "none"}))
            return st.result(metadata={"retrieval": "off: the use case declares no documents"})
        docs = load_documents(spec.documents)
        with st.write() as tmp:
            info = build_index(docs, spec, tmp, st.log)
        st.run.log_params({"retrieval." + k: v for k, v in spec.model_dump(mode="json").items()})
        chunks = [c for d in docs[:4] for c in chunk(d, spec.chunk_words, spec.chunk_overlap)]
        return st.result(
            metrics={
                "documents": info.documents,
                "chunks": info.chunks,
                "index_bytes": info.bytes,
                "build_seconds": info.build_seconds,
            },
            metadata={
                "index_version": info.digest,
                "method": info.method,
                "source": dg.MetadataValue.path(str(spec.documents)),
                "first_chunks": table([{"chunk": c.id, "text": c.text[:160]} for c in chunks[:8]]),
            },
        )


def pairs_with_passages(context, store: ArtifactStore, uc, rows: dict) -> None:
    """Preference pairs' prompts given their passages, as the task rows' inputs are."""
    if uc.retrieval.enabled:
        retriever = Retriever(store.upstream(context, "knowledge_index"))
        for pairs in rows.values():
            attach_passages(retriever, pairs, "prompt", uc.retrieval.top_k)


def retrieve_for(context, store: ArtifactStore, uc, splits, tmp, log) -> dict:
    """Each row of ``splits`` given the passages the use case's index finds for its input, the
    index copied into ``tmp`` (the dataset being written); what was used and how well it did
    (recall@k where rows name their document)."""
    if not uc.retrieval.enabled:
        (tmp / RETRIEVAL_FILE).write_text("{}")
        return {}
    index = store.upstream(context, "knowledge_index")
    retriever = Retriever(index)
    shutil.copytree(index, tmp / INDEX_DIR)  # the dataset carries the index its passages are from
    for split in splits.values():
        attach_passages(retriever, split.rows, uc.task.input_field, uc.retrieval.top_k)
    recall = {n: recall_at_k(s.rows, uc.retrieval.document_field) for n, s in splits.items()}
    log(f"retrieval: top {uc.retrieval.top_k} passages per row, recall@k {recall}")
    used = {
        "index": str(index),
        "index_version": retriever.version,
        "top_k": uc.retrieval.top_k,
        "template": uc.retrieval.template,
        "recall_at_k": recall,
    }
    (tmp / RETRIEVAL_FILE).write_text(json.dumps(used, indent=2))
    return used


def write_splits(splits, tmp) -> None:
    snapshot(splits["train"], tmp, "train.jsonl", "train")
    if splits["eval"].split:  # held out of the train file: the rows are the snapshot
        write_rows(tmp / "eval.jsonl", splits["eval"].rows)
        (tmp / "split.json").write_text(json.dumps(splits["eval"].split, indent=2))
    else:
        snapshot(splits["eval"], tmp, "eval.jsonl", "eval")


def recall_check(uc, retrieval: dict) -> dg.AssetCheckResult:
    recall = retrieval.get("recall_at_k", {}).get("eval")
    ok = recall is None or recall >= uc.retrieval.min_recall
    why = "off" if not retrieval else "not measurable (no document field)"
    meta = {"recall_at_k": recall, "min_recall": uc.retrieval.min_recall}
    return check("retrieval_finds_answers", ok, meta if recall is not None else {"retrieval": why})


@dg.asset(
    group_name="data",
    partitions_def=USE_CASES,
    kinds={"json", "mlflow"},
    owners=OWNERS,
    code_version="3",
    deps=["use_case", "knowledge_index"],
    check_specs=[
        use_case_check(
            "no_train_eval_leakage",
            asset="task_dataset",
            blocking=True,
            description="No eval input also occurs in the train split.",
        ),
        use_case_check(
            "retrieval_finds_answers",
            asset="task_dataset",
            description="Where the rows name the document that answers them, the eval rows' "
            "passages include it at least as often as retrieval.min_recall (recall@k).",
        ),
        use_case_check(
            "no_near_duplicates",
            asset="task_dataset",
            description="No eval input matches a train input once normalised (case, punctuation, "
            "articles, spacing).",
        ),
    ],
)
def task_dataset(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    """Task examples (input, reference output) in train and eval splits. Every data file of the use
    case (task and preference files, any format) is validated here, in rows and in tokens against
    the model's context where its tokenizer is at hand, so a fault stops the run before training."""
    with stage(context, "task_dataset", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        splits, _ = validate_data(uc)
        with artifact_store.write(st.target) as tmp:
            retrieval = retrieve_for(context, artifact_store, uc, splits, tmp, st.log)
            tokens = check_token_lengths(uc, splits, settings.state_home() / "cache" / "models")
            write_splits(splits, tmp)
        field = uc.task.input_field
        leaked = overlap(splits["train"].rows, splits["eval"].rows, field)
        near = near_duplicates(splits["train"].rows, splits["eval"].rows, field)
        st.run.log_params({f"{n}.sha256": s.sha256 for n, s in splits.items()})
        st.reads(
            attempt=True, train=("task_dataset", "train.jsonl"), eval=("task_dataset", "eval.jsonl")
        )
        return st.result(
            metrics={
                "train_rows": len(splits["train"].rows),
                "eval_rows": len(splits["eval"].rows),
                "leaked_rows": leaked,
                "near_duplicates": len(near),
                **{f"{n}_recall_at_k": r for n, r in retrieval.get("recall_at_k", {}).items()},
            },
            metadata={
                "splits": table([{"split": n, **s.stats} for n, s in splits.items()]),
                "source": dg.MetadataValue.path(str(uc.data.train)),
                "eval_split": describe_split(splits["eval"]),
                "retrieval": retrieval.get("index_version", "off"),
                **tokens,
            },
            check_results=[
                check("no_train_eval_leakage", leaked == 0, {"leaked_rows": leaked}, True),
                recall_check(uc, retrieval),
                check(
                    "no_near_duplicates",
                    not near,
                    {"rows": len(near), "first_ids": ", ".join(near[:5])},
                ),
            ],
        )


@dg.asset(
    group_name="data",
    partitions_def=USE_CASES,
    kinds={"json", "mlflow"},
    owners=OWNERS,
    code_version="2",
    deps=["use_case", "knowledge_index", "user_feedback"],
    check_specs=[
        use_case_check(
            "pairs_are_distinct",
            asset="preference_dataset",
            blocking=True,
            description="In every pair the chosen and rejected responses differ.",
        ),
        use_case_check(
            "no_task_eval_in_pairs",
            asset="preference_dataset",
            blocking=True,
            description="No task eval input is a preference training prompt (reward leakage).",
        ),
        use_case_check(
            "no_train_eval_leakage",
            asset="preference_dataset",
            blocking=True,
            description="No held-out prompt also occurs in the train pairs.",
        ),
    ],
)
def preference_dataset(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    """Preference pairs (prompt, chosen, rejected) for the reward model and DPO, train and held
    out: the use case's preference files, or pairs built from the task data when it has none;
    the train pairs with those the deployed model's users made by their feedback."""
    with stage(context, "preference_dataset", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        task, splits = validate_data(uc)
        rows = {n: splits[n].rows if splits else build_pairs(uc, task[n].rows) for n in SPLITS}
        feedback = feedback_pairs(uc, settings.feedback_url())  # users' pairs join the train ones
        rows["train"] = rows["train"] + feedback.rows
        pairs_with_passages(context, artifact_store, uc, rows)
        with st.write() as tmp:
            for name in ("train", "eval"):
                if splits:
                    snapshot(splits[name], tmp, f"preferences_{name}.jsonl", f"preferences_{name}")
                write_rows(tmp / f"preferences_{name}.jsonl", rows[name])
            feedback.write(tmp)
        same = [r["id"] for s in rows.values() for r in s if r["chosen"] == r["rejected"]]
        leaked = overlap(rows["train"], rows["eval"], "prompt")
        task_eval = [{"prompt": r[uc.task.input_field]} for r in task["eval"].rows]
        in_pairs = overlap(task_eval, rows["train"], "prompt")
        files = {f"preferences_{n}": (st.name, f"preferences_{n}.jsonl") for n in ("train", "eval")}
        st.reads(attempt=True, **files)
        return st.result(
            metrics={
                "train_pairs": len(rows["train"]),
                "eval_pairs": len(rows["eval"]),
                "feedback_pairs": len(feedback.rows),
                "leaked_rows": leaked,
            },
            metadata={"origin": "files" if splits else BUILT, "feedback_seq": feedback.seq},
            check_results=[
                check(
                    "pairs_are_distinct",
                    not same,
                    {"identical_pairs": len(same), "first_ids": ", ".join(same[:5])},
                    blocking=True,
                ),
                check("no_task_eval_in_pairs", in_pairs == 0, {"leaked_rows": in_pairs}, True),
                check("no_train_eval_leakage", leaked == 0, {"leaked_rows": leaked}, True),
            ],
        )
