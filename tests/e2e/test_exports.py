"""Exports of the tiny model to ONNX with KV cache, each proven against PyTorch: every variant
the compression stage writes, and a prompt-tuned model with its soft prompt baked in, behind the
server. (Tens of seconds each: the onnxruntime-genai model builder runs per variant.)"""

import numpy as np
from tiny import VIRTUAL

from lifecycle_dagster.ml.data import EvalSplit, format_prompt
from lifecycle_dagster.ml.evaluate import generate
from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer
from lifecycle_dagster.ml.soft_prompt import soft_prompt_ids, with_soft_prompt


def test_compress_exports_every_variant_checks_them_and_picks_by_policy(
    tmp_path, tiny_base, use_case, rows, runtime
):
    """fp32, int8 and int4 exported with KV cache; fp32 matches PyTorch (logits, tokens, text); every
    variant's cache is consistent; the policy picks the smallest (or fastest) within budget."""
    import json

    from lifecycle_dagster.ml.compress import CompressConfig, compress
    from lifecycle_dagster.ml.runtimes import GenaiGenerator

    evals = rows[1][:12]
    prompts = [format_prompt(use_case, r["dialogue"]) for r in evals]
    out = tmp_path / "onnx"
    out.mkdir()
    result = compress(
        tiny_base,
        out,
        CompressConfig(
            variants=["fp32", "int8", "int4"],
            block_size=16,
            max_metric_drop=1.0,  # the tiny model: policy, not quality
            max_new_tokens=8,
        ),
        runtime=runtime,
        max_new_tokens=12,
        check_prompts=prompts[:2],
        split=EvalSplit(use_case, evals),
        serving={"prompt_template": use_case.task.prompt_template},
    )
    sizes = {n: r.bytes for n, r in result.variants.items()}
    assert set(sizes) == {"fp32", "int8", "int4"}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]
    fp32 = result.variants["fp32"].faithfulness
    assert fp32.max_abs_logit_diff < 1e-3
    assert fp32.token_agreement == 1.0 and fp32.text_equal == 1.0
    assert result.fp32_matches and result.cache_in_use and result.deployable
    # No reference given: fp32's own scores are the reference, so fp32 loses nothing.
    assert result.variants["fp32"].quality_drop == 0.0
    assert result.selected == "int4"  # smallest, and the budget admits every variant
    chosen = json.loads((out / "selected.json").read_text())
    assert chosen["variant"] == "int4" and set(chosen["variants"]) == set(sizes)
    assert (out / "serving.json").exists()
    # What serving runs (onnxruntime-genai) continues a prompt; the text is not empty.
    gen = GenaiGenerator(out / "int4", 1)
    ids = load_tokenizer(tiny_base)(prompts[0], add_special_tokens=False)["input_ids"]
    assert len(gen.generate(ids, 8, ignore_eos=True)) == 8


def test_baked_model_exports_to_onnx_matches_and_is_served(
    tmp_path, prompt_tuned, tiny_base, use_case, rows, prompts, runtime
):
    """Saved and reloaded, the prompt-tuned model keeps its soft prompt; its ONNX export masks the
    soft tokens' logits, matches PyTorch, and the server prompts it with the soft prompt."""
    from lifecycle_dagster.ml.compress import CompressConfig, compress
    from lifecycle_dagster.ml.export import SUPPRESSED_LOGIT
    from lifecycle_dagster.ml.runtimes import OrtDecoder
    from lifecycle_dagster.ml.sft import load_sft
    from lifecycle_dagster.serving import ServedModel
    from lifecycle_dagster.serving.engine import Job, run

    baked, tok = load_sft(tiny_base, prompt_tuned[0], runtime)
    model_dir = tmp_path / "model"
    baked.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    reloaded, tok = load_causal_lm(model_dir, runtime), load_tokenizer(model_dir)
    ids = soft_prompt_ids(tok)
    assert len(ids) == VIRTUAL and list(reloaded.generation_config.suppress_tokens) == ids
    torch_text = generate(reloaded, tok, prompts[:4], max_new_tokens=12)

    out = tmp_path / "onnx"
    out.mkdir()
    result = compress(
        model_dir,
        out,
        CompressConfig(
            variants=["fp32", "int4", "int8_dynamic"],
            block_size=16,
            max_metric_drop=1.0,
            max_new_tokens=8,
        ),
        runtime=runtime,
        max_new_tokens=12,
        check_prompts=prompts[:2],
        split=EvalSplit(use_case, rows[1][:4]),
        serving={
            "prompt_template": use_case.task.prompt_template,
            "instruction": use_case.task.instruction,
            "max_new_tokens": 12,
        },
    )
    fp32 = result.variants["fp32"].faithfulness
    assert fp32.max_abs_logit_diff < 1e-3 and fp32.token_agreement == 1.0
    assert result.fp32_matches and result.cache_in_use
    assert result.variants["fp32"].predictions == torch_text
    for variant in ("fp32", "int4", "int8_dynamic"):
        logits = OrtDecoder(out / variant).prefill_logits(
            tok(with_soft_prompt(tok, prompts[:1])[0], add_special_tokens=False)["input_ids"]
        )
        assert logits.shape[-1] == len(tok)
        assert (logits[:, ids] < SUPPRESSED_LOGIT / 2).all()
        assert np.isfinite(logits).all()

    served = ServedModel.from_artifact(out, "m", "1", "candidate")
    row = rows[1][0]
    prompt = served.chat_prompt([("user", row["dialogue"])])
    (answer,) = run(served, [Job(served.encode(prompt, 12), 12, one_line=True)])
    plain = len(tok(prompts[0], add_special_tokens=False)["input_ids"])
    assert answer.prompt_tokens == plain + VIRTUAL and answer.text
    # What the server's generator writes, token by token, past EOS: never a soft-prompt token.
    for prompt in with_soft_prompt(tok, prompts[:4]):
        ids_in = served.tokenizer.encode(prompt, add_special_tokens=False).ids
        assert ids_in[:VIRTUAL] == ids
        written = served.generator.generate(ids_in, 24, ignore_eos=True, keep=VIRTUAL)
        assert len(written) == 24 and not set(ids) & set(written)


def weights(folder) -> dict:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(folder / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}


def test_a_re_rounded_export_runs_closer_to_its_model(tiny_base, prompts, runtime, tmp_path):
    """GPTQ on an int4 export: every block's matrices re-rounded on the grid the builder chose
    (only codes change), and the graph's logits closer to PyTorch's than nearest rounding's."""
    import json
    import shutil

    import torch

    from lifecycle_dagster.ml.export import ExportConfig, export_onnx
    from lifecycle_dagster.ml.gptq import GPTQ_FILE, refine
    from lifecycle_dagster.ml.runtimes import OrtDecoder

    config = ExportConfig(variants=["fp32", "int4"], int4_keep_int8="lm_head")
    exported = export_onnx(tiny_base, tmp_path / "onnx", config)
    plain = tmp_path / "plain"
    shutil.copytree(exported.variants["int4"], plain)
    result = refine(tiny_base, exported.variants["int4"], prompts[:16])

    assert result.matrices == 2 * 5 and result.error_ratio < 1.0
    assert json.loads((exported.variants["int4"] / GPTQ_FILE).read_text())["matrices"] == 10
    before, after = (weights(f) for f in (plain, exported.variants["int4"]))
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all("weight_Q4" in k for k in changed)  # the grid stays: only codes move
    model, tok = load_causal_lm(tiny_base, runtime), load_tokenizer(tiny_base)
    decoders = {"plain": OrtDecoder(plain), "gptq": OrtDecoder(exported.variants["int4"])}
    gaps = dict.fromkeys(decoders, 0.0)
    for prompt in prompts[:16]:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = model(torch.tensor([ids], device=model.device)).logits[0].float().cpu().numpy()
        for name, decoder in decoders.items():
            gaps[name] += float(((decoder.prefill_logits(ids) - ref) ** 2).mean())
    assert gaps["gptq"] < gaps["plain"], gaps


def test_a_trimmed_lm_head_keeps_its_tokens_logits_and_never_writes_the_others(
    tiny_base, prompts, tmp_path
):
    """lm_head_tokens: the int4 head keeps the rows of the train texts' tokens, the first ids and
    what the model writes after train prompts; their logits are the full head's, the others' are
    masked, greedy decoding writes only kept tokens, and the head reads fewer bytes."""
    import json
    import shutil

    from lifecycle_dagster.ml.export import SUPPRESSED_LOGIT, ExportConfig, export_onnx
    from lifecycle_dagster.ml.lm_head import TRIM_FILE, kept_tokens, trim_lm_head, written_tokens
    from lifecycle_dagster.ml.runtimes import GenaiGenerator, OrtDecoder

    tok = load_tokenizer(tiny_base)
    texts = prompts[:4]
    config = ExportConfig(variants=["fp32", "int4"], int4_keep_int8="lm_head", int4_gptq=False)
    full = export_onnx(tiny_base, tmp_path / "full", config).variants["int4"]
    trimmed = tmp_path / "trimmed"
    shutil.copytree(full, trimmed)
    keep = kept_tokens(tok, texts, frequent=16)
    assert set(range(16)) <= set(keep) and len(keep) < len(tok)
    result = trim_lm_head(trimmed, keep, SUPPRESSED_LOGIT)
    assert result.kept == len(keep) and result.bytes_after < result.bytes_before
    dropped = np.setdiff1d(np.arange(len(tok)), keep)
    for prompt in prompts[4:]:  # prompts the kept set was not made from
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a, b = OrtDecoder(full).prefill_logits(ids), OrtDecoder(trimmed).prefill_logits(ids)
        assert a.shape == b.shape
        np.testing.assert_allclose(b[:, keep], a[:, keep], atol=1e-4)
        assert (b[:, dropped] == SUPPRESSED_LOGIT).all()
        written = GenaiGenerator(trimmed).generate(ids, 12)
        assert set(written) <= set(keep)

    # Through the config, with what the int4 model writes after train prompts kept too.
    written = written_tokens(full, tok, prompts[:4])
    assert written
    config = config.model_copy(update={"lm_head_tokens": 16})
    exported = export_onnx(
        tiny_base, tmp_path / "config", config, calibration=texts, prompts=prompts[:4]
    )
    record = json.loads((exported.variants["int4"] / TRIM_FILE).read_text())
    assert record["kept"] == len(set(keep) | written) and record["frequent"] == 16
    assert record["written"] == len(written)
    for prompt in prompts[:4]:  # after those prompts it writes what it wrote untrimmed
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        untrimmed = GenaiGenerator(full).generate(ids, 32)
        assert GenaiGenerator(exported.variants["int4"]).generate(ids, 32) == untrimmed
    assert not (exported.variants["fp32"] / TRIM_FILE).exists()  # fp32 stays PyTorch's match
