"""Faithfulness of an export: its logits, greedy tokens and text against PyTorch's, and its KV cache
against a full recomputation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lifecycle_dagster.ml.runtimes import GenaiGenerator, OrtDecoder

# Decoding step by step with the KV cache must give what a full recomputation gives (both in
# onnxruntime): the same greedy token at every step, and logits within float noise (fp32) or within
# 5% of the logit range (quantised kernels take other paths for one row than for many). A cache that
# is ignored or misaligned predicts from the wrong context and fails both.
CACHE_ATOL = 5e-2
CACHE_RTOL = 0.05


def cache_matches(stepped, recomputed) -> bool:
    """Step-by-step logits (with the cache) against a full recomputation, row by row: close within
    tolerance, and each step's greedy token one the recomputation also ranks best (a near-tie,
    within the same tolerance, may go either way)."""
    import numpy as np

    spread = float(recomputed.max() - recomputed.min())
    tol = max(CACHE_ATOL, CACHE_RTOL * spread)
    if float(np.abs(stepped - recomputed).max()) > tol:
        return False
    chosen = stepped.argmax(-1)
    best = recomputed.max(-1)
    return bool((recomputed[np.arange(len(chosen)), chosen] >= best - tol).all())


@dataclass
class Faithfulness:
    variant: str
    max_abs_logit_diff: float
    token_agreement: float
    text_equal: float
    cache_consistent: bool
    ort_tokens_per_s: float
    torch_tokens_per_s: float
    examples: list[dict] = field(default_factory=list)


def verify_against_torch(
    model,
    tokenizer,
    decoder: OrtDecoder,
    prompts: list[str],
    *,
    max_new_tokens: int,
    variant: str,
    generator: GenaiGenerator | None = None,
    torch_memo: dict | None = None,
) -> Faithfulness:
    """Compare prefill logits, greedy tokens and decoded text of ONNX and PyTorch, batch 1. The
    tokens come from ``generator`` (what serving runs) when given, else from ``decoder``.
    ``torch_memo`` (a dict kept across the variants of one model) holds PyTorch's side, computed
    once per prompt.

    Also checks that decoding with the cache gives the logits a full recomputation gives: an export
    that silently ignores its cache fails here. Logits of suppressed tokens and of those a
    trimmed LM head drops (masked in the graph) are left out of both comparisons.
    """
    import numpy as np

    from lifecycle_dagster.ml.export import SUPPRESSED_LOGIT
    from lifecycle_dagster.ml.soft_prompt import soft_prompt_ids, with_soft_prompt

    suppressed = list(getattr(model.generation_config, "suppress_tokens", None) or [])
    keep = len(soft_prompt_ids(tokenizer))

    max_diff, agree, total_tok, equal = 0.0, 0, 0, 0
    ort_time = torch_time = 0.0
    ort_tokens = torch_tokens = 0
    cache_ok = True
    examples = []
    for prompt, model_prompt in zip(prompts, with_soft_prompt(tokenizer, prompts), strict=True):
        ids = tokenizer(model_prompt, add_special_tokens=False)["input_ids"]
        memo = torch_memo if torch_memo is not None else {}
        if (tuple(ids), max_new_tokens) not in memo:
            memo[tuple(ids), max_new_tokens] = _torch_side(model, tokenizer, ids, max_new_tokens)
        ref_logits, ref_tokens, seconds = memo[tuple(ids), max_new_tokens]
        torch_time += seconds
        torch_tokens += max(1, len(ref_tokens))
        ort_logits = decoder.prefill_logits(ids)
        columns = np.ones(ort_logits.shape[-1], dtype=bool)
        columns[suppressed] = False
        columns &= (ort_logits > SUPPRESSED_LOGIT / 2).any(axis=0)  # tokens a trimmed head drops
        max_diff = max(max_diff, float(np.abs(ref_logits - ort_logits)[:, columns].max()))

        t0 = time.perf_counter()
        if generator is not None:
            ort_tok = generator.generate(ids, max_new_tokens, keep=keep)
        else:
            ort_tok, _ = decoder.generate(ids, max_new_tokens)
        ort_time += time.perf_counter() - t0
        ort_tokens += max(1, len(ort_tok))

        n = max(len(ref_tokens), len(ort_tok))
        agree += sum(1 for a, b in zip(ref_tokens, ort_tok, strict=False) if a == b)
        total_tok += max(1, n)
        ref_text = tokenizer.decode(ref_tokens, skip_special_tokens=True)
        ort_text = tokenizer.decode(ort_tok, skip_special_tokens=True)
        equal += int(ref_text == ort_text)
        examples.append({"prompt_tail": prompt[-60:], "torch": ref_text, "onnx": ort_text})

        # The cache check stays inside one decoder: its own greedy steps, with the cache, against
        # one pass over the same tokens without it.
        dec_tok, step_logits = decoder.generate(ids, max_new_tokens)
        if dec_tok:
            full = decoder.prefill_logits(ids + dec_tok[:-1])
            k = min(len(step_logits), len(dec_tok))
            stepped = np.stack(step_logits[:k])[:, columns]
            recomputed = full[len(ids) - 1 : len(ids) - 1 + k][:, columns]
            if not cache_matches(stepped, recomputed):
                cache_ok = False
    return Faithfulness(
        variant=variant,
        max_abs_logit_diff=max_diff,
        token_agreement=agree / max(1, total_tok),
        text_equal=equal / max(1, len(prompts)),
        cache_consistent=cache_ok,
        ort_tokens_per_s=ort_tokens / max(ort_time, 1e-9),
        torch_tokens_per_s=torch_tokens / max(torch_time, 1e-9),
        examples=examples,
    )


def _torch_side(model, tokenizer, ids: list[int], max_new_tokens: int):
    """PyTorch's prefill logits, its greedy tokens (EOS left out) and the seconds they took."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).logits[0].float().cpu().numpy()
        start = time.perf_counter()
        gen = model.generate(
            torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        seconds = time.perf_counter() - start
    tokens = [t for t in gen[0, len(ids) :].tolist() if t != tokenizer.eos_token_id]
    return logits, tokens, seconds
