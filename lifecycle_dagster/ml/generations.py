"""Greedy generations kept by the weights that made them and the prompts they answer, so that no
model generates the same split twice: the SFT model is scored by its own stage, by alignment
(before it trains) and by evaluation; the base model by prompting and evaluation. A reward
model's scores of the same texts are kept alike.

A generation is found again only when everything that decides it is equal: a digest of every
weight (its dtype and shape too), the tokenizer's vocabulary and special tokens, the device type,
the model's generation config, the prompts, the token budget, the batch size (batches are padded
together) and the generation code's version. A model in training mode (dropout on) is never
cached. Entries are JSON files under
``$LIFECYCLE_HOME/cache/generations``, written whole (temporary file, then rename); the oldest go
beyond ``MAX_ENTRIES``. ``LIFECYCLE_GENERATION_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from lifecycle_dagster import settings

# Bump when generation or its post-processing changes what a prompt's answer is.
VERSION = 1
MAX_ENTRIES = 512


def cache_dir() -> Path | None:
    """Where generations are kept, or None when the cache is off."""
    if os.environ.get("LIFECYCLE_GENERATION_CACHE", "1").lower() in ("0", "false", "no", "off"):
        return None
    return settings.state_home() / "cache" / "generations"


def weights_digest(model) -> str:
    """A digest of every parameter and buffer (name, dtype, shape, bytes); a tensor shared by two
    names (tied embeddings) is read once."""
    import torch

    h = hashlib.blake2b(digest_size=20)
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=False).items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.data_ptr() in seen or tensor.numel() == 0:
            continue
        seen.add(tensor.data_ptr())
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        h.update(memoryview(flat.cpu().numpy()))
    return h.hexdigest()


def vocabulary_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.blake2b(json.dumps(vocab).encode(), digest_size=16).hexdigest()


def key(model, tokenizer, prompts: Sequence[str], **decoding) -> str | None:
    """The cache key of greedy answers to ``prompts``, or None when they must not be cached."""
    if getattr(model, "training", False):
        return None
    device = next(model.parameters()).device.type
    h = hashlib.blake2b(digest_size=20)
    parts = {
        "version": VERSION,
        "weights": weights_digest(model),
        "vocabulary": vocabulary_digest(tokenizer),
        "device": device,
        "generation_config": _generation_config(model),
        "special": [tokenizer.eos_token_id, tokenizer.pad_token_id],
        "decoding": decoding,
        "prompts": list(prompts),
    }
    h.update(json.dumps(parts, sort_keys=True).encode())
    return h.hexdigest()


def _generation_config(model) -> str:
    """What the model's own generation config adds (suppressed tokens, say)."""
    config = getattr(model, "generation_config", None)
    return json.dumps(config.to_diff_dict(), sort_keys=True, default=str) if config else ""


def scores_key(digest: str, texts: Sequence[str], **extra) -> str:
    """The cache key of a frozen scorer's (a reward model's, its weights' ``digest``) scores of
    ``texts``."""
    parts = {"version": VERSION, "scorer": digest, "extra": extra, "texts": list(texts)}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=20).hexdigest()


def get(cache_key: str | None, count: int) -> list | None:
    """The answers kept under ``cache_key`` (as many as there are prompts), or None."""
    folder = cache_dir()
    if cache_key is None or folder is None:
        return None
    path = folder / f"{cache_key}.json"
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))["answers"]
    except (OSError, ValueError, KeyError):
        return None
    if not isinstance(answers, list) or len(answers) != count:
        return None
    os.utime(path)  # recently used: the last to go
    return answers


def put(cache_key: str | None, answers: list) -> None:
    folder = cache_dir()
    if cache_key is None or folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cache_key}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"answers": answers}, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    entries = sorted(folder.glob("*.json"), key=_mtime)
    for old in entries[:-MAX_ENTRIES]:
        old.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by another process
        return 0.0
