"""The ``lifecycle`` command: run the lifecycle in the local Dagster instance and summarise it."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

from tabulate import tabulate

from lifecycle_dagster import settings
from lifecycle_dagster.ml.sft import SFTMethodConfig

SUMMARY_METRICS = {
    "use_case": [],
    "task_dataset": ["train_rows", "eval_rows"],
    "preference_dataset": ["train_pairs", "eval_pairs"],
    "base_model": ["parameters", "pretrain_loss_end"],
    "prompt_baseline": ["zero_shot_{metric}", "best_{metric}"],
    "sft_adapter": ["loss_start", "loss_end", "{metric}_after"],
    "reward_model": ["pairwise_accuracy"],
    "aligned_model": ["reward_before", "reward_after", "mean_kl", "candidate"],
    "evaluation": ["{metric}", "mean_reward", "perplexity", "verdict"],
    "distilled_model": ["pruned.kl_after", "distilled.kl_after"],
    "onnx_model": ["selected_variant", "size_ratio", "speedup", "onnx_{metric}", "{metric}_drop"],
    "champion_model": ["onnx_champion", "aligned_champion"],
    "lifecycle_report": ["total_seconds"],
}


def prepare_dagster_home() -> Path:
    """DAGSTER_HOME under the state dir, with the project's dagster.yaml when none is there."""
    home = settings.dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    template = Path(__file__).resolve().parent.parent / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and template.exists():
        shutil.copy(template, home / "dagster.yaml")
    return home


def run_config(
    profile: str, config_file: str | None, overrides: dict | None, base: str | None = None
) -> dict:
    """The lifecycle job's run config: the use case as profile, base use case, file and a parsed
    override."""
    use_case = {"profile": profile, "overrides": overrides or {}}
    if base:
        use_case["use_case"] = base
    if config_file:
        use_case["use_case_file"] = str(Path(config_file).resolve())
    return {
        "ops": {"use_case": {"config": use_case}},
        "loggers": {"console": {"config": {"log_level": "INFO"}}},
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_rows(instance, result) -> list[dict]:
    stats = {s.step_key: s for s in instance.get_run_step_stats(result.run_id)}
    rows = []
    materialized = {
        e.materialization.asset_key.to_user_string(): {
            k: v.value for k, v in e.materialization.metadata.items()
        }
        for e in result.get_asset_materialization_events()
    }
    metric = materialized.get("use_case", {}).get("primary_metric", "")
    for asset, keys in SUMMARY_METRICS.items():
        st = stats.get(asset)
        meta = materialized.get(asset, {})
        keys = [k.format(metric=metric) for k in keys]
        duration = (st.end_time - st.start_time) if st and st.end_time and st.start_time else None
        status = st.status.value.lower() if st and st.status else "not run"
        rows.append(
            {
                "stage": asset,
                "status": status,
                "duration": f"{duration:.1f}s" if duration is not None else "-",
                "metrics": ", ".join(f"{k}={_fmt(meta[k])}" for k in keys if k in meta) or "-",
                "artifact": str(meta.get("artifact_path", "-")),
                "mlflow": str(meta.get("mlflow_run", "-")),
                "attempt_run": meta.get("mlflow_attempt_run_id", ""),
            }
        )
    return rows


def print_table(rows: list[dict], file=sys.stdout) -> None:
    cols = ["stage", "status", "duration", "metrics", "artifact"]
    print(tabulate([[r[c] for c in cols] for r in rows], headers=cols), file=file)
    urls = [(r["stage"], r["mlflow"]) for r in rows if r["mlflow"] != "-"]
    if urls:
        print("\nMLflow runs:", file=file)
        attempt = next((r for r in rows if r.get("attempt_run") and r["mlflow"] != "-"), None)
        if attempt:  # the parent run all stage runs nest under, beside them in the same experiment
            url = attempt["mlflow"].rsplit("/", 1)[0] + "/" + attempt["attempt_run"]
            print(f"  {'(the attempt)':<20} {url}", file=file)
        for stage, url in urls:
            print(f"  {stage:<20} {url}", file=file)


def cmd_run(args) -> int:
    prepare_dagster_home()
    import dagster as dg

    from lifecycle_dagster.definitions import defs
    from lifecycle_dagster.lib.partitions import PROFILE_TAG, USE_CASE_TAG, USE_CASES
    from lifecycle_dagster.ml.errors import InputError
    from lifecycle_dagster.ml.usecase_loader import load_use_case, parse_overrides

    try:  # fail fast, before Dagster starts, on a bad profile, use-case file or override
        overrides = parse_overrides(args.override)
        uc = load_use_case(
            args.config, profile=args.profile, use_case=args.use_case, overrides=overrides
        )
    except InputError as exc:
        print(f"lifecycle: {exc}", file=sys.stderr)
        return 2
    instance = dg.DagsterInstance.get()
    job = defs().resolve_job_def("lifecycle_job")
    # The use case is the partition: its runs, lineage and history stay apart from other use cases'.
    instance.add_dynamic_partitions(USE_CASES.name, [uc.name])
    print(
        f"lifecycle: use case {uc.name} (partition), profile {args.profile}, "
        f"state in {settings.state_home()}",
        flush=True,
    )
    start = time.monotonic()
    result = job.execute_in_process(
        run_config=run_config(args.profile, args.config, overrides, args.use_case),
        instance=instance,
        partition_key=uc.name,
        tags={PROFILE_TAG: args.profile, USE_CASE_TAG: uc.name},
        raise_on_error=False,
    )
    rows = summary_rows(instance, result)
    print(
        f"\nlifecycle run {result.run_id} "
        f"{'succeeded' if result.success else 'FAILED'} in {time.monotonic() - start:.0f}s\n"
    )
    print_table(rows)
    failed_checks = [c for c in result.get_asset_check_evaluations() if not c.passed]
    if not result.success:
        for event in result.all_events:
            if event.event_type_value == "STEP_FAILURE":
                cause = root_cause(event.event_specific_data.error)
                print(f"\n{event.step_key} failed:\n{cause}", file=sys.stderr)
    for check in failed_checks:  # last: a missed threshold is the cause a person looks for
        why = check.metadata.get("shortfall")
        why = f": {why.value}" if why is not None else ""
        print(
            f"check failed: {check.asset_key.to_user_string()}:{check.check_name}{why}",
            file=sys.stderr if not result.success else sys.stdout,
        )
    if not result.success:
        return 1
    return 1 if any(c.severity.value == "ERROR" for c in failed_checks) else 0


def root_cause(error) -> str:
    """The message of the exception at the bottom of a step failure (a ``file:line: field``
    fault, not the Dagster wrapper around it), without its class name."""
    while error.cause is not None:
        error = error.cause
    message = error.message.strip()
    head, sep, rest = message.partition(f"{error.cls_name}: ")
    return rest if sep and " " not in head else message


def cmd_validate(args) -> int:
    """Check a use case, its data and its model source without running anything."""
    from lifecycle_dagster.ml.data import check_token_lengths, describe_split, validate_data
    from lifecycle_dagster.ml.errors import InputError, collect
    from lifecycle_dagster.ml.usecase_loader import load_use_case

    start = time.monotonic()
    try:
        uc = load_use_case(args.file, profile=args.profile)
        errors, task, prefs, tokens = [], None, None, {}
        try:
            task, prefs = validate_data(uc)
            tokens = check_token_lengths(uc, task, settings.state_home() / "cache" / "models")
        except InputError as exc:
            errors.append(exc)
        except ValueError as exc:  # the model cannot prompt the use case as it asks
            errors.append(InputError(args.file, str(exc)))
        collect(errors)
    except InputError as exc:
        print(f"lifecycle validate: {args.file} is not ready:", file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return 2
    pairs = prefs and f"{len(prefs['train'].rows)} train / {len(prefs['eval'].rows)} held out"
    lines = {
        "use case": f"{uc.name} ({uc.kind.name}, primary metric {uc.primary_metric})",
        "train": f"{len(task['train'].rows)} rows from {task['train'].path}",
        "eval": f"{len(task['eval'].rows)} rows, {describe_split(task['eval'])}",
        "preference pairs": pairs if prefs else "none (built from the task data if trained)",
        "reward": uc.reward_source,
        "base model": f"{uc.base_model.source} {uc.base_model.path or ''}".strip(),
        "lengths": (
            f"longest {tokens['longest_tokens']} of {tokens['context_length']} "
            f"({tokens['token_check']}; prompts {tokens['prompt_format']})"
            if "longest_tokens" in tokens
            else tokens.get("token_check", "-")
        ),
    }
    for key, value in lines.items():
        print(f"{key:<17} {value}")
    print(f"\nlifecycle validate: ok in {time.monotonic() - start:.1f}s")
    return 0


def cmd_init(args) -> int:
    """Draft a commented use case from a data file."""
    from lifecycle_dagster.ml.errors import InputError
    from lifecycle_dagster.ml.scaffold import draft, render

    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"lifecycle init: {out} exists; --force replaces it", file=sys.stderr)
        return 2
    data = Path(args.data).resolve()
    try:
        found = draft(data, args.task)
    except (InputError, ValueError) as exc:
        print(f"lifecycle init: {exc}", file=sys.stderr)
        return 2
    name = args.name or "".join(c if c.isalnum() or c in "-_" else "_" for c in data.stem)
    relative = os.path.relpath(data, out.resolve().parent)
    out.write_text(render(found, name, relative))
    print(
        f"lifecycle init: wrote {out}: {found.kind} ({found.why}); input '{found.input}', "
        f"target '{found.target}', id {repr(found.id) if found.id else 'by line'}"
        + (f", {len(found.labels)} labels" if found.labels else "")
        + (f", fields {', '.join(found.fields)}" if found.fields else "")
    )
    print(
        f"next: lifecycle validate {out} --profile tiny && lifecycle run --profile tiny --config {out}"
    )
    return 0


def cmd_estimate(args) -> int:
    from lifecycle_dagster.ml.estimate import estimate
    from lifecycle_dagster.ml.runtime import select_runtime

    runtime = select_runtime(args.device)
    result = estimate(
        float(args.params),
        device=runtime.device,
        adaptation=SFTMethodConfig().updated({"lora_r": args.lora_r} if args.lora_r else {}),
        tokens_per_param=args.tokens_per_param,
    )
    print(f"Pre-training feasibility for {float(args.params):.3g} parameters on this machine:\n")
    print(result.markdown())
    print(
        "\nCompute-optimal tokens follow ~20 per parameter; FLOPs ~ 6 x params x tokens; time uses "
        "the measured dense matmul rate, an upper bound on real training throughput."
    )
    return 0


def cmd_profiles(_args) -> int:
    from lifecycle_dagster.ml.usecase import PROFILES_DIR

    for path in sorted(PROFILES_DIR.glob("*.yaml")):
        first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        print(f"{path.stem:<10} {first.lstrip('# ')}")
    return 0


def cmd_use_cases(_args) -> int:
    """The packaged use cases: their task kind, primary metric and alignment's reward."""
    from tabulate import tabulate

    from lifecycle_dagster.ml.usecase import USECASES_DIR
    from lifecycle_dagster.ml.usecase_loader import load_use_case

    rows = []
    for path in sorted(USECASES_DIR.glob("*/usecase.yaml")):
        uc = load_use_case(path)
        rows.append(
            {
                "use case": uc.name,
                "task kind": uc.kind.name,
                "primary metric": uc.primary_metric,
                "reward": uc.reward_source,
                "preference files": "yes" if uc.data.has_preferences else "no",
            }
        )
    print(tabulate(rows, headers="keys"))
    print("\nRun one: lifecycle run --profile tiny --use-case <use case>")
    return 0


EXPERIMENT_METRICS = ("mean_reward", "harmless", "format_ok")  # after the primary metric


def experiment_rows(client, experiment, limit: int) -> list[dict]:
    """One row per evaluated attempt, newest first: its verdict, suite and metrics, and the
    attempt it escalates from."""
    runs = client.search_runs(
        [experiment.experiment_id],
        "tags.`lifecycle.stage` = 'evaluation'",
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    )
    short = {r.info.run_id: r.data.tags.get("dagster.run_id", "")[:8] for r in runs}
    primary = [r.data.tags.get("primary_metric", "rouge_l") for r in runs]
    columns = [*dict.fromkeys(primary), *EXPERIMENT_METRICS]
    rows = []
    for r in runs:
        tags, metrics = r.data.tags, r.data.metrics
        parent = tags.get("lifecycle.escalated_from", "")
        rows.append(
            {
                "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.info.start_time / 1000)),
                "dagster run": tags.get("dagster.run_id", "")[:8],
                "attempt": tags.get("lifecycle.attempt", "?"),
                "verdict": tags.get("verdict", "?"),
                "suite": tags.get("suite", "-"),
                **{m: f"{metrics[m]:.4f}" if m in metrics else "-" for m in columns},
                "escalates": (short.get(parent) or _dagster_run_of(client, parent)) or "-",
            }
        )
    return rows


def _dagster_run_of(client, mlflow_run_id: str) -> str:
    """The Dagster run (id prefix) an MLflow run was recorded by."""
    if not mlflow_run_id:
        return ""
    return client.get_run(mlflow_run_id).data.tags.get("dagster.run_id", "")[:8]


def cmd_experiments(args) -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from lifecycle_dagster.resources.registry import ModelRegistry, registered_name

    uri = settings.mlflow_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiments = [
        e
        for e in client.search_experiments()
        if e.name != "Default" and (not args.use_case or e.name == args.use_case)
    ]
    if not experiments:
        print(f"lifecycle: no experiments in {uri}", file=sys.stderr)
        return 1
    registry = ModelRegistry(uri)
    for exp in experiments:
        print(f"\nuse case {exp.name} (MLflow experiment {exp.experiment_id})")
        for kind in ("aligned", "onnx"):
            name = registered_name(exp.name, kind)
            try:
                aliases = registry.aliases(name)
            except MlflowException:  # not registered yet
                continue
            print(f"  {name}: " + ", ".join(f"{a} v{v}" for a, v in sorted(aliases.items())))
        rows = experiment_rows(client, exp, args.limit)
        if not rows:
            print("  no evaluated attempt yet")
            continue
        print(textwrap.indent(tabulate(rows, headers="keys"), "  "))
    return 0


def cmd_serve(args) -> int:
    from lifecycle_dagster.ml.errors import InputError
    from lifecycle_dagster.ml.usecase_loader import load_use_case
    from lifecycle_dagster.resources.registry import registered_name
    from lifecycle_dagster.serving import API_KEY_ENV, LOOPBACK, ServedModel, Server

    api_key = os.environ.get(API_KEY_ENV) or None
    if args.host not in LOOPBACK and api_key is None:
        print(
            f"lifecycle serve: binding to {args.host} makes the model reachable beyond this "
            f"machine; set {API_KEY_ENV} (clients send it as a Bearer token) or bind 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    name = args.model
    if not name:
        try:
            name = registered_name(load_use_case(profile=args.profile).name, "onnx")
        except InputError as exc:
            print(f"lifecycle: {exc}", file=sys.stderr)
            return 2
    uri = settings.mlflow_uri()
    try:
        model = ServedModel.from_registry(uri, name, args.alias, threads=args.threads)
    except (LookupError, FileNotFoundError, ValueError) as exc:
        print(f"lifecycle serve: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("lifecycle.serve").setLevel(logging.INFO)
    server = Server.build(
        model,
        tracking_uri=uri,
        tracing=not args.no_tracing,
        feedback_url=settings.feedback_url(),
        api_key=api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        follow_s=args.follow_s,
        threads=args.threads,
    )
    print(
        f"lifecycle serve: {model.name} version {model.version} ({args.alias}, {model.variant}) "
        f"on http://{args.host}:{args.port}/v1 (OpenAI API; API key "
        f"{'required' if api_key else 'off: loopback only'}); following alias {args.alias}",
        flush=True,
    )
    server.run(args.host, args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lifecycle", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize the whole lifecycle in the local instance")
    run.add_argument("--profile", default="demo", help="named preset (see `lifecycle profiles`)")
    run.add_argument(
        "--use-case",
        help="packaged use case (see `lifecycle use-cases`) or YAML in place of the profile's",
    )
    run.add_argument("--config", help="use-case YAML, complete or layered over the profile's")
    run.add_argument(
        "--override", help="YAML mapping applied last, e.g. '{adaptation: {max_steps: 10}}'"
    )
    run.set_defaults(func=cmd_run)
    val = sub.add_parser(
        "validate", help="check a use case, its data and its model source; run nothing"
    )
    val.add_argument("file", help="use-case YAML (complete, or a layer over the profile's)")
    val.add_argument("--profile", help="validate as layered over this profile")
    val.set_defaults(func=cmd_validate)
    ini = sub.add_parser("init", help="draft a commented use case from a data file")
    ini.add_argument("--data", required=True, help="JSONL, CSV, TSV, Parquet or save_to_disk dir")
    ini.add_argument("--task", help="the task kind (default: guessed from the columns)")
    ini.add_argument("--out", default="usecase.yaml", help="where to write (default usecase.yaml)")
    ini.add_argument("--name", help="the use case's name (default: from the data file)")
    ini.add_argument("--force", action="store_true", help="replace an existing --out file")
    ini.set_defaults(func=cmd_init)
    lora_r = SFTMethodConfig.model_fields["lora_r"]
    est = sub.add_parser("estimate", help="what pre-training a model of a given size would cost")
    est.add_argument("--params", required=True, help="parameter count, e.g. 1e9")
    est.add_argument(
        "--lora-r",
        type=int,
        help=f"{lora_r.description} For the memory estimate; default {lora_r.default}.",
    )
    est.add_argument("--tokens-per-param", type=float, default=20.0)
    est.add_argument("--device", default="auto", help="where to measure the matmul rate")
    est.set_defaults(func=cmd_estimate)
    exps = sub.add_parser("experiments", help="list attempts per use case and compare metrics")
    exps.add_argument("--use-case", help="only this use case (MLflow experiment)")
    exps.add_argument("--limit", type=int, default=20, help="attempts per use case, newest first")
    exps.set_defaults(func=cmd_experiments)
    srv = sub.add_parser("serve", help="serve the champion ONNX artifact (OpenAI-compatible API)")
    srv.add_argument("--model", help="registered model name (default: <use case>-onnx)")
    srv.add_argument("--profile", default="demo", help="use case whose model to serve")
    srv.add_argument("--alias", default="champion", help="registry alias to load")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    srv.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    srv.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting at most; more get 429"
    )
    srv.add_argument(
        "--follow-s",
        type=float,
        default=10.0,
        help="seconds between looks at the alias (a moved champion is loaded); 0: never",
    )
    srv.add_argument("--no-tracing", action="store_true", help="do not trace requests to MLflow")
    srv.set_defaults(func=cmd_serve)
    prof = sub.add_parser("profiles", help="list the named profiles")
    prof.set_defaults(func=cmd_profiles)
    ucs = sub.add_parser("use-cases", help="list the packaged use cases and their task kinds")
    ucs.set_defaults(func=cmd_use_cases)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
