"""Training scales out: two CPU processes launched by torchrun, talking over gloo, fine-tune the
LoRA adapter that one process fine-tunes. Each step's global batch is the same 8 examples (each
process takes 4 of them) and gradients are averaged across the processes, so the loss curves agree
up to the rounding of the all-reduce: within ``TOLERANCE`` at every step."""

import numpy as np

from lifecycle_dagster.ml.data import load_task_data, sft_records
from lifecycle_dagster.ml.distributed import fine_tune
from lifecycle_dagster.ml.sft import SFTMethodConfig, load_sft, train_sft

CONFIG = SFTMethodConfig(method="lora", max_steps=40, batch_size=8, learning_rate=3e-3)
TOLERANCE = 1e-4  # largest loss difference at any step, in nats


def test_two_gloo_processes_train_as_one_within_tolerance(tmp_path, tiny_base, use_case, runtime):
    records = sft_records(use_case, load_task_data(use_case)["train"].rows)
    one = train_sft(tiny_base, records, tmp_path / "one", CONFIG, runtime)
    lines = []
    two = fine_tune(tiny_base, records, tmp_path / "two", CONFIG, runtime, 2, lines.append)
    assert any("sft[lora]: step 40/40" in line for line in lines), lines  # rank 0's progress
    assert [s for s, _ in two.loss_curve] == list(range(1, CONFIG.max_steps + 1))
    a = np.array([v for _, v in one.loss_curve])
    b = np.array([v for _, v in two.loss_curve])
    gap = float(np.abs(a - b).max())
    print(f"\n1 process: loss {a[0]:.4f} -> {a[-1]:.4f}; 2 processes: {b[0]:.4f} -> {b[-1]:.4f}")
    print(f"largest difference at any step {gap:.2e} (tolerance {TOLERANCE:.0e})")
    assert b[-5:].mean() < b[:5].mean() - 0.2  # the two processes trained
    assert gap < TOLERANCE
    # Rank 0 alone wrote the adapter, which loads and generates.
    model, tok = load_sft(tiny_base, tmp_path / "two", runtime)
    out = model.generate(**tok("#Person1#: hi", return_tensors="pt"), max_new_tokens=4)
    assert out.shape[1] > 0
