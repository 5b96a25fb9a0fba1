"""Trainer checkpoints: a half-written one is never resumed, abandoned ones are pruned, the
interval is checked. (A killed training resumed: tests/e2e/test_killed_training.py.)"""

import os
import time

import pytest

from lifecycle_dagster.ml.progress import Checkpoints


def test_a_half_written_checkpoint_is_never_resumed(tmp_path):
    """A process killed while saving leaves ``checkpoint-N`` without its trainer state (written
    last): the one before it is resumed and the partial one removed."""
    from lifecycle_dagster.ml.progress import last_complete_checkpoint

    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")
    assert (tmp_path / "checkpoint-10").is_dir()  # only looked at
    assert last_complete_checkpoint(tmp_path, drop_incomplete=True) == str(
        tmp_path / "checkpoint-5"
    )
    assert not (tmp_path / "checkpoint-10").exists()
    assert last_complete_checkpoint(tmp_path / "checkpoint-5") is None


def test_a_checkpoint_interval_is_not_negative(tmp_path):
    with pytest.raises(ValueError, match="checkpoint interval must be >= 0"):
        Checkpoints(tmp_path, -1)


def test_checkpoints_nobody_resumed_for_a_week_are_removed(tmp_path):
    from lifecycle_dagster.lib.stage import CHECKPOINT_MAX_AGE_S, prune_checkpoints

    stale, fresh = tmp_path / "run-a-0123", tmp_path / "run-b-4567"
    for folder in (stale, fresh):
        (folder / "checkpoint-10").mkdir(parents=True)
    week_ago = time.time() - CHECKPOINT_MAX_AGE_S - 60
    os.utime(stale, (week_ago, week_ago))
    prune_checkpoints(tmp_path, CHECKPOINT_MAX_AGE_S)
    assert not stale.exists() and (fresh / "checkpoint-10").is_dir()
    prune_checkpoints(tmp_path / "never-made", CHECKPOINT_MAX_AGE_S)  # nothing to prune: fine
