"""Depth pruning and distillation on a 4-block model: block influence, a pruned model whose KV
cache still lines up, and students that move toward their teacher."""

import json

import pytest
import torch
from tiny import TINY

from lifecycle_dagster.ml.distill import (
    STUDENTS_FILE,
    DistillConfig,
    block_influence,
    evenly_spaced,
    keep_blocks,
    least_influential,
    make_students,
    read_students,
)
from lifecycle_dagster.ml.evaluate import generate
from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, use_case, rows, runtime):
    """A 4-block model, briefly pre-trained on the use case's corpus."""
    from lifecycle_dagster.ml.pretrain import PretrainConfig, pretrain

    corpus = [r["dialogue"] for r in rows[0]] + [r["summary"] for r in rows[0]]
    out = tmp_path_factory.mktemp("teacher4")
    config = PretrainConfig(**{**TINY, "num_layers": 4}, steps=80, batch_size=16)
    pretrain(corpus, out, config, device=runtime.device)
    return out


def test_block_choice():
    assert evenly_spaced(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert evenly_spaced(4, 2) == [0, 3]
    assert least_influential([0.9, 0.1, 0.5, 0.2], 2) == [0, 2]
    assert least_influential([0.0, 0.3, 0.5, 0.2], 1) == [0, 1, 2]  # the first block stays
    with pytest.raises(ValueError):
        least_influential([0.1, 0.2], 1)
    with pytest.raises(ValueError, match="at least 2"):
        DistillConfig(student_layers=1)


def test_a_pruned_model_decodes_with_its_cache(teacher, runtime, prompts):
    model, tok = load_causal_lm(teacher, runtime), load_tokenizer(teacher)
    influence = block_influence(model, tok, prompts)
    assert len(influence) == 4 and all(0 <= v <= 2 for v in influence)
    keep_blocks(model, least_influential(influence, 2))
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    ids = tok(prompts[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        full = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.tolist() == full.tolist()


def test_students_learn_from_the_teacher(teacher, runtime, prompts, rows, use_case, tmp_path):
    from lifecycle_dagster.ml.data import format_prompt

    train = [format_prompt(use_case, r["dialogue"]) for r in rows[0][:32]]
    config = DistillConfig(
        prune_layers=1, heal_steps=12, student_layers=2, student_steps=24,
        learning_rate=1e-3, batch_size=8, examples=32,
    )  # fmt: skip
    result = make_students(
        teacher, "teacher-1", tmp_path, train, prompts, config, runtime,
        max_new_tokens=16, batch_size=8,
    )  # fmt: skip
    assert set(result.students) == {"pruned", "distilled"}
    for student in result.students.values():
        assert student.kl_after < student.kl_before, student.row()
        assert student.learned
        losses = [h["loss"] for h in student.history]
        assert len(losses) == student.steps
    assert len(result.students["pruned"].kept) == 3
    assert result.students["distilled"].kept == [0, 3]
    # Saved as models that load and answer, beside the teacher's tokenizer.
    assert read_students(tmp_path, "teacher-2") == {}  # another candidate's students: none
    folders = read_students(tmp_path, "teacher-1")
    assert set(folders) == {"pruned", "distilled"}
    for name, folder in folders.items():
        loaded = load_causal_lm(folder, runtime)
        assert loaded.config.num_hidden_layers == len(result.students[name].kept)
        assert generate(loaded, load_tokenizer(folder), prompts[:2], max_new_tokens=4, batch_size=2)
    record = json.loads((tmp_path / STUDENTS_FILE).read_text())
    assert len(record["influence"]) == 4


def test_activation_aware_scales_keep_the_function_and_cut_int4_error(teacher, runtime, prompts):
    from lifecycle_dagster.ml.awq import fake_int4, scale_model

    model, tok = load_causal_lm(teacher, runtime), load_tokenizer(teacher)
    ids = tok(prompts[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    result = scale_model(model, tok, prompts, block_size=32)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4)  # the same function in fp32
    assert len(result.alphas) == 4 * 3
    assert result.error_ratio <= 1.0  # alpha 0 (plain rounding) is always a candidate
    w = torch.randn(8, 64)
    assert (fake_int4(w, 32) - w).abs().max() <= w.abs().max() / 7 / 2 + 1e-6


def test_training_that_drives_a_student_away_is_undone(teacher, runtime, prompts, tmp_path):
    from lifecycle_dagster.ml.distill import held_out_kl

    config = DistillConfig(prune_layers=1, heal_steps=3, learning_rate=5.0, examples=8)
    result = make_students(
        teacher, "t", tmp_path, prompts, prompts, config, runtime, max_new_tokens=8, batch_size=8
    )
    pruned = result.students["pruned"]
    assert pruned.kl_after > pruned.kl_before and pruned.reverted and not pruned.learned
    # What was saved is the untrained student: its KL is the one before training.
    saved = load_causal_lm(read_students(tmp_path, "t")["pruned"], runtime)
    model, tok = load_causal_lm(teacher, runtime), load_tokenizer(teacher)
    answers = generate(model, tok, prompts, max_new_tokens=8, batch_size=8)
    pairs = [(p, a) for p, a in zip(prompts, answers, strict=True) if a.strip()]
    assert abs(held_out_kl(saved, model, tok, pairs, 8) - pruned.kl_before) < 1e-4
