"""Pre-training from scratch: a byte-level BPE tokenizer and a small Llama-architecture model.

This is the lifecycle's most expensive phase in real life (days to months on large clusters); here it
runs at toy scale on the use case's own corpus so that the tiny profile needs no download.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field, model_validator

from lifecycle_dagster.ml.progress import Log, Progress, loss_ends
from lifecycle_dagster.ml.tunables import Tunables

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


class PretrainConfig(Tunables):
    """A small Llama-architecture model pre-trained on the use case's corpus (the use case's
    ``base_model.scratch``)."""

    vocab_size: int = Field(1024, ge=260, description="Byte-level BPE vocabulary size.")
    hidden_size: int = Field(64, gt=0, description="Width of the residual stream.")
    num_layers: int = Field(2, gt=0, description="Transformer blocks.")
    num_heads: int = Field(4, gt=0, description="Attention heads.")
    num_kv_heads: int = Field(2, gt=0, description="Key/value heads (grouped-query attention).")
    intermediate_size: int = Field(192, gt=0, description="Width of the MLP.")
    context_length: int = Field(512, ge=64, description="Longest sequence the model accepts.")
    steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(16, gt=0, description="Sequences per step.")
    block_size: int = Field(128, gt=0, description="Tokens per training sequence.")
    learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate.")
    seed: int = Field(0, description="Seed of initialisation and data order.")

    @model_validator(mode="after")
    def _heads_divide(self) -> PretrainConfig:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
        return self


@dataclass
class PretrainResult:
    path: Path
    parameters: int
    tokens_seen: int
    loss_start: float
    loss_end: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Train a byte-level BPE tokenizer (plain ByteLevel decoder) and save it as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=4096,
    )
    hf.save_pretrained(out_dir)
    return hf


def pretrain(
    texts: list[str],
    out_dir: Path,
    config: PretrainConfig,
    *,
    device: str = "cpu",
    log: Log | None = None,
) -> PretrainResult:
    """Tokenizer, then next-token prediction on packed blocks of the corpus; saves safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = train_tokenizer(texts, config.vocab_size, out_dir)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
    block = min(config.block_size, config.context_length)
    if len(stream) < block:
        raise ValueError(
            f"pre-training corpus has {len(stream)} tokens, fewer than one block ({block})"
        )
    n_blocks = len(stream) // block
    data = torch.tensor(stream[: n_blocks * block]).view(n_blocks, block)

    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.context_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(model_config).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    warmup = max(1, config.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        decay = max(1, config.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    progress = Progress("pretrain", config.steps, log)
    model.train()
    for step in range(1, config.steps + 1):
        idx = [rng.randrange(n_blocks) for _ in range(config.batch_size)]
        batch = data[idx].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        progress.update(step, loss=loss.item())
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    loss_start, loss_end = loss_ends(progress)
    return PretrainResult(
        path=out_dir,
        parameters=sum(p.numel() for p in model.parameters()),
        tokens_seen=config.steps * config.batch_size * block,
        loss_start=loss_start,
        loss_end=loss_end,
        loss_curve=progress.series("loss"),
    )
