"""Data: the task's train/eval splits and the preference pairs, validated and snapshotted."""

import shutil

import dagster as dg

from lifecycle_dagster.lib.partitions import OWNERS, USE_CASES
from lifecycle_dagster.lib.render import table
from lifecycle_dagster.lib.results import check
from lifecycle_dagster.lib.stage import stage
from lifecycle_dagster.ml.artifacts import file_sha256
from lifecycle_dagster.ml.data import load_jsonl, load_preference_data, load_task_data, overlap
from lifecycle_dagster.resources.artifacts import ArtifactStore
from lifecycle_dagster.resources.mlflow import MlflowTracking


def snapshot(split, dest) -> None:
    """Copy a validated file, refusing it if it changed since it was validated."""
    shutil.copy(split.path, dest)
    if file_sha256(dest) != split.sha256:
        raise dg.Failure(f"{split.path} changed while it was being validated; run again")


@dg.asset(
    group_name="data",
    partitions_def=USE_CASES,
    kinds={"json", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["use_case"],
    check_specs=[
        dg.AssetCheckSpec(
            "no_train_eval_leakage",
            asset="task_dataset",
            blocking=True,
            description="No eval input also occurs in the train split.",
        )
    ],
)
def task_dataset(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    """Task examples (input, reference output) in train and eval splits, validated on load."""
    with stage(context, "task_dataset", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        splits = load_task_data(uc)
        with artifact_store.write(st.target) as tmp:
            for name, split in splits.items():
                snapshot(split, tmp / f"{name}.jsonl")
        leaked = overlap(splits["train"].rows, splits["eval"].rows, uc.task.input_field)
        stats = [{"split": n, **s.stats} for n, s in splits.items()]
        st.run.log_params({f"{n}.sha256": s.sha256 for n, s in splits.items()})
        return st.result(
            metrics={
                "train_rows": len(splits["train"].rows),
                "eval_rows": len(splits["eval"].rows),
                "leaked_rows": leaked,
            },
            metadata={
                "splits": table(stats),
                "source": dg.MetadataValue.path(str(uc.data.train.parent)),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name="no_train_eval_leakage",
                    passed=leaked == 0,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={"leaked_rows": leaked},
                )
            ],
        )


@dg.asset(
    group_name="data",
    partitions_def=USE_CASES,
    kinds={"json", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["use_case"],
    check_specs=[
        dg.AssetCheckSpec(
            "pairs_are_distinct",
            asset="preference_dataset",
            blocking=True,
            description="In every pair the chosen and rejected responses differ.",
        ),
        dg.AssetCheckSpec(
            "no_task_eval_in_pairs",
            asset="preference_dataset",
            blocking=True,
            description="No task eval input is a preference training prompt (reward leakage).",
        ),
        dg.AssetCheckSpec(
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
    """Preference pairs (prompt, chosen, rejected) for the reward model, train and held out."""
    with stage(context, "preference_dataset", artifact_store, mlflow_tracking) as st:
        splits = load_preference_data(st.use_case)
        with st.write() as tmp:
            for name, split in splits.items():
                snapshot(split, tmp / f"preferences_{name}.jsonl")
        same = [r["id"] for s in splits.values() for r in s.rows if r["chosen"] == r["rejected"]]
        leaked = overlap(splits["train"].rows, splits["eval"].rows, "prompt")
        uc = st.use_case
        field = uc.task.input_field
        task_eval = load_jsonl(
            uc.data.eval, ("id", field, uc.task.target_field), max_chars=uc.data.max_chars
        ).rows
        in_pairs = overlap(
            [{"prompt": r[field]} for r in task_eval], splits["train"].rows, "prompt"
        )
        stats = [{"split": n, **s.stats} for n, s in splits.items()]
        return st.result(
            metrics={
                "train_pairs": len(splits["train"].rows),
                "eval_pairs": len(splits["eval"].rows),
                "leaked_rows": leaked,
            },
            metadata={"splits": table(stats)},
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
