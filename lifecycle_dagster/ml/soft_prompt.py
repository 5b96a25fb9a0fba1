"""A trained soft prompt (prompt tuning) baked into the model's vocabulary.

Prompt tuning learns N input embeddings that peft places before every prompt; they live beside the
model, not in it. Everything after adaptation (alignment, evaluation, the ONNX export, serving)
wants a plain causal LM, so the soft prompt becomes N special tokens ``<|soft_prompt_0|>`` ...
whose embedding rows are the learned vectors. The model is then an ordinary model with a larger
vocabulary, prompted with ``soft_prefix(tokenizer) + prompt``: the same embeddings at the same
positions as peft's forward pass, so the same outputs.

The tokenizer carries the soft prompt: a model whose vocabulary holds these tokens is always
prompted with them (``with_soft_prompt``), wherever it is loaded. With tied input and output
embeddings the new rows are output logits too; the tokens are suppressed in generation
(``generation_config.suppress_tokens`` in PyTorch, a logits mask in the ONNX graph), so the model
never writes them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

TOKEN = "<|soft_prompt_{}|>"
PATTERN = re.compile(r"<\|soft_prompt_(\d+)\|>")
ADAPTER_FILE = "adapter_model.safetensors"
EMBEDDINGS_KEY = "prompt_embeddings"  # how peft saves a prompt-tuning adapter


def soft_tokens(tokenizer) -> list[tuple[str, int]]:
    """The soft-prompt tokens of a tokenizer (HF or ``tokenizers.Tokenizer``), in order, with ids."""
    if hasattr(tokenizer, "get_added_vocab"):
        added = tokenizer.get_added_vocab()
    else:
        added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
    found = sorted(
        (int(m.group(1)), token, index)
        for token, index in added.items()
        if (m := PATTERN.fullmatch(token))
    )
    return [(token, index) for _, token, index in found]


def soft_prompt_ids(tokenizer) -> list[int]:
    return [index for _, index in soft_tokens(tokenizer)]


def soft_prefix(tokenizer) -> str:
    """The text that puts the soft prompt before a prompt; empty for a model without one."""
    return "".join(token for token, _ in soft_tokens(tokenizer))


def with_soft_prompt(tokenizer, prompts: Sequence[str]) -> list[str]:
    """``prompts`` as this model must see them: after its soft prompt, when it has one."""
    prefix = soft_prefix(tokenizer)
    return [p if not prefix or p.startswith(prefix) else prefix + p for p in prompts]


def strip_soft_prompt(text: str) -> str:
    """The task prompt without soft-prompt tokens (what a reward model, trained without them,
    judges)."""
    return PATTERN.sub("", text)


def prompt_embeddings(adapter_dir: Path):
    """The learned soft prompt (num_virtual_tokens x hidden) of a peft prompt-tuning adapter."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / ADAPTER_FILE))
    if EMBEDDINGS_KEY not in tensors:
        raise ValueError(f"{adapter_dir / ADAPTER_FILE}: no '{EMBEDDINGS_KEY}' (not prompt tuning)")
    return tensors[EMBEDDINGS_KEY]


def bake_soft_prompt(model, tokenizer, adapter_dir: Path):
    """Add the adapter's soft prompt to ``model`` and ``tokenizer`` as tokens (both in place);
    returns them. The tokens are suppressed in the model's generation config."""
    import torch
    from tokenizers import AddedToken

    embeddings = prompt_embeddings(adapter_dir)
    table = model.get_input_embeddings()
    hidden = table.weight.shape[1]
    if embeddings.shape[1] != hidden:
        raise ValueError(
            f"{adapter_dir}: soft prompt of width {embeddings.shape[1]} for a model of hidden "
            f"size {hidden}"
        )
    if soft_tokens(tokenizer):
        raise ValueError("the tokenizer already holds a soft prompt")
    tokens = [TOKEN.format(i) for i in range(embeddings.shape[0])]
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True
    )
    ids = tokenizer.convert_tokens_to_ids(tokens)
    _check_encoding(tokenizer, "".join(tokens), ids)
    if max(ids) >= table.weight.shape[0]:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    # peft places the soft prompt after the embedding lookup; models that scale their lookups
    # (Gemma: x sqrt(hidden)) would scale the baked rows too, so they are stored unscaled.
    scale = getattr(model.get_input_embeddings(), "embed_scale", None)
    if scale is not None:
        embeddings = embeddings / float(scale)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = embeddings.to(dtype=weight.dtype, device=weight.device)
    suppressed = list(model.generation_config.suppress_tokens or [])
    model.generation_config.suppress_tokens = sorted({*suppressed, *ids})
    return model, tokenizer


def _check_encoding(tokenizer, prefix: str, ids: list[int]) -> None:
    """The prefix must encode to the soft tokens and leave the prompt's own encoding alone, as
    peft's training saw it (a tokenizer that treats text after a special token differently, e.g.
    Metaspace with prepend_scheme 'first', does not)."""
    probe = "Summarise the dialogue: hello, world."
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    prefixed = tokenizer(prefix + probe, add_special_tokens=False)["input_ids"]
    if prefixed != ids + plain:
        raise ValueError(
            "this tokenizer encodes text after the soft-prompt tokens differently from the text "
            f"alone ({prefixed[len(ids) : len(ids) + 4]} vs {plain[:4]}); the baked soft prompt "
            "would not reproduce prompt tuning with it"
        )
