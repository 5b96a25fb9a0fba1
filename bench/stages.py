"""Time each training stage of the ml/ layer on the tiny model, on whatever device is present.

    python bench/stages.py            # CUDA when present (bf16 where supported), else CPU

Prints one line per stage (device, dtype, seconds, loss start -> end) and the ratios between stages
from this one run. It imports no Dagster and no MLflow, so it also runs on a bare GPU host.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from lifecycle_dagster.ml.align import AlignMethodConfig, align
from lifecycle_dagster.ml.data import (
    format_prompt,
    load_preference_data,
    load_task_data,
    preference_records,
    sft_records,
)
from lifecycle_dagster.ml.evaluate import RewardScorer, evaluate_model
from lifecycle_dagster.ml.pretrain import PretrainConfig, pretrain
from lifecycle_dagster.ml.reward import RewardMethodConfig, pairwise_accuracy, train_reward_model
from lifecycle_dagster.ml.runtime import select_runtime
from lifecycle_dagster.ml.sft import SFTMethodConfig, load_sft, train_sft
from lifecycle_dagster.ml.usecase_loader import load_use_case


def main() -> None:
    uc = load_use_case(profile="tiny")
    task, prefs = load_task_data(uc), load_preference_data(uc)
    runtime = select_runtime("auto")
    print(f"runtime: {runtime.describe()}")
    rows = task["train"].rows
    evals = task["eval"].rows[:32]
    prompts = [format_prompt(uc, r["dialogue"]) for r in evals]
    refs = [r["summary"] for r in evals]
    times: dict[str, float] = {}

    def score(model, tok, reward=None):
        return evaluate_model(
            model,
            tok,
            prompts,
            refs,
            task=uc.task,
            metric=uc.primary_metric,
            max_new_tokens=32,
            batch_size=32,
            reward=reward,
            with_perplexity=False,
        )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        corpus = [r["dialogue"] for r in rows] + [r["summary"] for r in rows]
        pre = pretrain(corpus, tmp / "base", PretrainConfig(steps=300), device=runtime.device)
        times["pretrain"] = time.perf_counter() - t
        print(f"pretrain: {times['pretrain']:.1f}s loss {pre.loss_start:.3f} -> {pre.loss_end:.3f}")
        for method, steps, lr in (
            ("prompt_tuning", 150, 3e-2),
            ("lora", 150, 3e-3),
            ("full", 100, 1e-3),
        ):
            t = time.perf_counter()
            res = train_sft(
                tmp / "base",
                sft_records(uc, rows),
                tmp / method,
                SFTMethodConfig(method=method, max_steps=steps, learning_rate=lr),
                runtime,
                init_text=uc.task.instruction,
            )
            times[f"sft_{method}"] = time.perf_counter() - t
            model, tok = load_sft(tmp / "base", tmp / method, runtime)
            ev = score(model, tok)
            print(
                f"sft[{method}]: {times[f'sft_{method}']:.1f}s loss {res.loss_start:.3f} -> "
                f"{res.loss_end:.3f}, {ev.metric} {ev.primary:.3f}"
            )
        t = time.perf_counter()
        rm = train_reward_model(
            tmp / "base",
            preference_records(uc, prefs["train"].rows),
            tmp / "rm",
            RewardMethodConfig(max_steps=120),
            runtime,
        )
        times["reward"] = time.perf_counter() - t
        scorer = RewardScorer(tmp / "rm", runtime)
        acc, _ = pairwise_accuracy(scorer, preference_records(uc, prefs["eval"].rows))
        print(
            f"reward: {times['reward']:.1f}s loss {rm.loss_start:.3f} -> {rm.loss_end:.3f}, "
            f"held-out accuracy {acc:.2f}"
        )
        policy, tok = load_sft(tmp / "base", tmp / "lora", runtime, merge=True, training=True)
        before = score(policy, tok, scorer)
        policy.train()
        t = time.perf_counter()
        align(
            policy,
            tok,
            tmp / "aligned",
            AlignMethodConfig(max_steps=30, batch_size=16, learning_rate=3e-4),
            runtime,
            prompts=[format_prompt(uc, r["dialogue"]) for r in rows],
            scorer=scorer,
        )
        times["grpo"] = time.perf_counter() - t
        from lifecycle_dagster.ml.models import load_causal_lm

        after = score(load_causal_lm(tmp / "aligned", runtime), tok, scorer)
        print(
            f"grpo: {times['grpo']:.1f}s reward {before.mean_reward:.3f} -> "
            f"{after.mean_reward:.3f}, {after.metric} {before.primary:.3f} -> {after.primary:.3f}"
        )
    base = times["sft_lora"]
    print("ratios to LoRA SFT time: " + ", ".join(f"{k} {v / base:.2f}x" for k, v in times.items()))


if __name__ == "__main__":
    main()
