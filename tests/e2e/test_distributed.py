"""Training scales out: two CPU processes launched by torchrun, talking over gloo, fine-tune the
LoRA adapter that one process fine-tunes, on the same global batch (4 examples a step each instead
of 8 in one). The data order differs (each process reads its shard), so the curves are compared
smoothed, within ``TOLERANCE``."""

import numpy as np

from lifecycle_dagster.ml.data import load_task_data, sft_records
from lifecycle_dagster.ml.distributed import launch_sft
from lifecycle_dagster.ml.sft import SFTMethodConfig, load_sft, train_sft

CONFIG = SFTMethodConfig(method="lora", max_steps=40, batch_size=8, learning_rate=3e-3)
WINDOW = 8  # steps per point of the smoothed curves
TOLERANCE = 0.15  # largest gap between the smoothed curves, in nats of loss


def smoothed(curve: list[tuple[int, float]]) -> np.ndarray:
    losses = np.array([v for _, v in curve])
    return losses.reshape(-1, WINDOW).mean(axis=1)


def test_two_gloo_processes_train_as_one_within_tolerance(tmp_path, tiny_base, use_case, runtime):
    records = sft_records(use_case, load_task_data(use_case)["train"].rows)
    one = train_sft(tiny_base, records, tmp_path / "one", CONFIG, runtime)
    two = launch_sft(tiny_base, records, tmp_path / "two", CONFIG, runtime, processes=2)
    assert [s for s, _ in two.loss_curve] == list(range(1, CONFIG.max_steps + 1))
    a, b = smoothed(one.loss_curve), smoothed(two.loss_curve)
    gap = float(np.abs(a - b).max())
    print(f"\nsmoothed loss, 1 process: {np.round(a, 3)}; 2 processes: {np.round(b, 3)}")
    print(f"largest gap {gap:.3f} (tolerance {TOLERANCE})")
    assert b[-1] < b[0] - 0.3  # the two processes trained
    assert gap < TOLERANCE
    # Rank 0 wrote one adapter, which loads and generates.
    model, tok = load_sft(tiny_base, tmp_path / "two", runtime)
    out = model.generate(**tok("#Person1#: hi", return_tensors="pt"), max_new_tokens=4)
    assert out.shape[1] > 0
