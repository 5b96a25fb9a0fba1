"""Running an exported artifact: ``OrtDecoder`` (plain onnxruntime, one step at a time, feeding
``present.*`` back as ``past_key_values.*``, so a check exercises the cache exactly as serving does)
and ``GenaiGenerator`` (onnxruntime-genai, what serving and the evaluation of variants run)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lifecycle_dagster.ml.export import MODEL_FILE
from lifecycle_dagster.ml.progress import Log


class OrtDecoder:
    """Greedy decoding of an exported folder with onnxruntime, reusing the KV cache every step."""

    def __init__(self, folder: Path, threads: int = 1):
        import onnxruntime as ort

        cfg = json.loads((Path(folder) / "genai_config.json").read_text())["model"]
        dec = cfg["decoder"]
        self.layers = dec["num_hidden_layers"]
        self.kv_heads = dec["num_key_value_heads"]
        self.head_size = dec["head_size"]
        eos = cfg["eos_token_id"]
        self.eos = set(eos if isinstance(eos, list) else [eos])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(Path(folder) / MODEL_FILE), opts, providers=["CPUExecutionProvider"]
        )
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        if not any(n.startswith("past_key_values") for n in self.input_names):
            raise ValueError(f"{folder}: the exported model has no KV-cache inputs")

    def empty_past(self, batch: int = 1) -> dict:
        import numpy as np

        shape = (batch, self.kv_heads, 0, self.head_size)
        return {
            f"past_key_values.{i}.{kv}": np.zeros(shape, dtype=np.float32)
            for i in range(self.layers)
            for kv in ("key", "value")
        }

    def step(self, ids, past: dict, total: int):
        """One forward pass: ``ids`` is one sequence (a list) or a batch of equal-length sequences
        (a 2-D array, no padding); ``total`` is the length including the cache. Returns the logits
        and the cache to feed next."""
        import numpy as np

        batch = np.atleast_2d(np.asarray(ids, dtype=np.int64))
        feeds = {
            "input_ids": batch,
            "attention_mask": np.ones((batch.shape[0], total), dtype=np.int64),
            **past,
        }
        outs = self.session.run(None, feeds)
        result = dict(zip(self.output_names, outs, strict=True))
        present = {
            f"past_key_values.{i}.{kv}": result[f"present.{i}.{kv}"]
            for i in range(self.layers)
            for kv in ("key", "value")
        }
        return result["logits"], present

    def prefill_logits(self, ids: list[int]):
        logits, _ = self.step(ids, self.empty_past(), len(ids))
        return logits[0]

    def generate(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], list]:
        """Greedy tokens and the logits that chose each one."""
        logits, past = self.step(ids, self.empty_past(), len(ids))
        out, chosen_logits = [], []
        total = len(ids)
        for _ in range(max_new_tokens):
            last = logits[0, -1]
            token = int(last.argmax())
            chosen_logits.append(last)
            if token in self.eos:
                break
            out.append(token)
            total += 1
            logits, past = self.step([token], past, total)
        return out, chosen_logits


class GenaiGenerator:
    """Greedy generation with onnxruntime-genai: the decode loop in C++ over onnxruntime, the KV
    cache kept in buffers it reuses across steps. What serving and the quality checks run."""

    def __init__(self, folder: Path, threads: int = 1):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.overlay(
            json.dumps(
                {
                    "model": {
                        "decoder": {
                            "session_options": {
                                "intra_op_num_threads": threads,
                                "inter_op_num_threads": 1,
                            }
                        }
                    }
                }
            )
        )
        self.model = og.Model(config)
        cfg = json.loads((Path(folder) / "genai_config.json").read_text())["model"]
        eos = cfg["eos_token_id"]
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.context_length = int(cfg["context_length"])
        pad = cfg.get("pad_token_id")
        self.pad_token_id = int(pad if pad is not None else min(self.eos))

    def start(self, batch, max_new_tokens: int, ignore_eos: bool = False):
        """A generator with ``batch`` (equal-length prompts) already prefilled."""
        import numpy as np

        ids = np.asarray(batch, dtype=np.int32)
        params = self.og.GeneratorParams(self.model)
        total = ids.shape[1] + max_new_tokens
        options = {"max_length": total, "do_sample": False, "batch_size": ids.shape[0]}
        if ignore_eos:
            options["min_length"] = total
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        return generator

    def generate(
        self, ids: list[int], max_new_tokens: int, ignore_eos: bool = False, keep: int = 0
    ) -> list[int]:
        """Greedy continuation of one prompt, without the EOS token. A prompt that would not fit
        the context with ``max_new_tokens`` is cut from the left (its end is what is continued),
        after its first ``keep`` tokens (a soft prompt), which stay."""
        room = self.context_length - max_new_tokens - keep
        if room <= 0:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} + {keep} kept >= context {self.context_length}"
            )
        ids = ids[:keep] + ids[keep:][-room:]
        generator = self.start([ids], max_new_tokens, ignore_eos)
        while not generator.is_done():
            generator.generate_next_token()
        out = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
        if not ignore_eos:
            for i, token in enumerate(out):
                if token in self.eos:
                    return out[:i]
        return out

    def decode_batch(self, batch: list[list[int]], max_new_tokens: int) -> float:
        """Seconds spent decoding ``max_new_tokens`` for each of a batch of equal-length prompts
        (the prefill excluded), EOS ignored: a throughput measurement."""
        generator = self.start(batch, max_new_tokens, ignore_eos=True)
        start = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
        return time.perf_counter() - start


def generate_texts(
    generator: GenaiGenerator,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    log: Log | None = None,
    stage: str = "onnx",
) -> tuple[list[str], float]:
    """Greedy completions from the ONNX artifact, one prompt at a time (after the model's soft
    prompt, when it has one); and decode tokens/s."""
    from lifecycle_dagster.ml.evaluate import clean_completion
    from lifecycle_dagster.ml.soft_prompt import soft_prompt_ids, with_soft_prompt

    keep = len(soft_prompt_ids(tokenizer))
    texts, tokens, seconds = [], 0, 0.0
    for i, prompt in enumerate(with_soft_prompt(tokenizer, prompts), 1):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        start = time.perf_counter()
        out = generator.generate(ids, max_new_tokens, keep=keep)
        seconds += time.perf_counter() - start
        tokens += max(1, len(out))
        texts.append(clean_completion(tokenizer.decode(out, skip_special_tokens=True)))
        if log and (i % 16 == 0 or i == len(prompts)):
            log(f"{stage}: {i}/{len(prompts)} generated")
    return texts, tokens / max(seconds, 1e-9)
