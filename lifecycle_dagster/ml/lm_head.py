"""The LM head trimmed to the tokens a use case can need. At batch 1 a decoded token reads every
weight once, and the LM head (vocabulary x hidden) is the largest single matrix: a third of the
bytes of an int4 SmolLM2. A narrow use case writes few of the vocabulary's tokens, so an export can
keep only the head's rows for those: the tokens of the use case's train texts (prompts and answers;
each word also as it would start a line and as it would follow a space), the first ``frequent``
ids of the vocabulary (byte-level BPE numbers its merges in the order they were learnt, so the
first ids are the bytes and the commonest words: any text stays writable), every special token,
and the tokens the quantised model itself writes, greedy, after the first ``OWN_PROMPTS`` train
prompts (its habits: words no train text holds). The graph then scatters the kept logits back into
the full vocabulary, the others at a fill value (``SUPPRESSED_LOGIT``), so the runtime, the sampler
and the server see logits of the same width as before and never pick a trimmed token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HEAD_NODE_PREFIX = "/lm_head/MatMul"
OWN_PROMPTS = 64
TRIM_FILE = "lm_head.json"  # in a trimmed variant's folder: what its head kept


@dataclass(frozen=True)
class TrimResult:
    kept: int
    vocabulary: int
    bytes_before: int
    bytes_after: int


def written_tokens(
    folder: Path, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32
) -> set:
    """The ids the ONNX model in ``folder`` writes, greedy, after the first ``OWN_PROMPTS``
    ``prompts``."""
    from lifecycle_dagster.ml.runtime import available_cores
    from lifecycle_dagster.ml.runtimes import GenaiGenerator

    generator = GenaiGenerator(Path(folder), available_cores())
    written: set[int] = set()
    for prompt in prompts[:OWN_PROMPTS]:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        written.update(generator.generate(ids, max_new_tokens))
    return written


def kept_tokens(
    tokenizer, texts: Sequence[str], frequent: int, written: set[int] | None = None
) -> list[int]:
    """The token ids an export keeps in its LM head: those of ``texts``, the first ``frequent``
    ids, the tokenizer's special tokens and ``written`` (``written_tokens``)."""
    vocabulary = len(tokenizer)
    ids = set(range(min(frequent, vocabulary))) | set(tokenizer.all_special_ids)
    ids |= set(written or ())
    words = set()
    for text in texts:
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
        words.update(text.split())
    for word in words:  # each word as it starts a line and as it follows a space
        for form in (word, " " + word):
            ids.update(tokenizer(form, add_special_tokens=False)["input_ids"])
    return sorted(i for i in ids if 0 <= i < vocabulary)


def trim_lm_head(folder: Path, keep: Sequence[int], fill: float) -> TrimResult:
    """Rewrite ``folder``'s model.onnx so that its LM head (a MatMulNBits node) computes only the
    rows ``keep`` and scatters them into logits of the full width, ``fill`` elsewhere. Written
    whole beside the old files, then moved over them."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from lifecycle_dagster.ml.gptq import save_whole

    path = Path(folder) / "model.onnx"
    model = onnx.load(str(path))
    graph = model.graph
    head = next(
        (n for n in graph.node if n.name.startswith(HEAD_NODE_PREFIX) and "logits" in n.output),
        None,
    )
    if head is None or head.op_type != "MatMulNBits":
        raise ValueError(f"{path}: no quantised LM head (MatMulNBits) produces the logits")
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    vocab = int(attrs["N"])
    rows = np.asarray(sorted(set(keep)), dtype=np.int64)
    if rows.size == 0 or rows[-1] >= vocab:
        raise ValueError(f"{path}: kept token ids must lie in [0, {vocab})")
    inits = {i.name: i for i in graph.initializer}
    readers = Counter(name for n in graph.node for name in n.input)
    before = after = 0
    for slot, name in enumerate(head.input):
        if slot == 0 or name not in inits:  # packed weights, scales, zero points: rows first
            continue
        array = numpy_helper.to_array(inits[name])
        per_row = array.reshape(vocab, -1)[rows].reshape((rows.size, *array.shape[1:]))
        if array.shape[0] != vocab:  # a flat [N * blocks] layout
            per_row = per_row.reshape(-1)
        before, after = before + array.nbytes, after + per_row.nbytes
        if readers[name] > 1:  # shared with a tied embedding, which keeps every row
            head.input[slot] = f"{name}_kept"
            graph.initializer.append(numpy_helper.from_array(per_row, head.input[slot]))
        else:
            inits[name].CopyFrom(numpy_helper.from_array(per_row, name))
    for a in head.attribute:
        if a.name == "N":
            a.i = int(rows.size)
    logits = next(o for o in graph.output if o.name == "logits")
    dtype = helper.tensor_dtype_to_np_dtype(logits.type.tensor_type.elem_type)
    head.output[list(head.output).index("logits")] = "logits_kept"
    graph.initializer.extend(
        [
            numpy_helper.from_array(rows, "lm_head_kept_ids"),
            numpy_helper.from_array(np.full(vocab, fill, dtype=dtype), "lm_head_fill"),
            numpy_helper.from_array(np.asarray([0], dtype=np.int64), "lm_head_axis0"),
            numpy_helper.from_array(np.asarray([2], dtype=np.int64), "lm_head_axis2"),
            numpy_helper.from_array(np.asarray([vocab], dtype=np.int64), "lm_head_vocab"),
        ]
    )
    p = "/lm_head/trim"
    graph.node.extend(
        [
            helper.make_node("Shape", ["logits_kept"], [f"{p}/shape"], f"{p}/Shape"),
            helper.make_node(
                "Slice",
                [f"{p}/shape", "lm_head_axis0", "lm_head_axis2"],
                [f"{p}/batch_seq"],
                f"{p}/Slice",
            ),
            helper.make_node(
                "Concat", [f"{p}/batch_seq", "lm_head_vocab"], [f"{p}/full"], f"{p}/Concat", axis=0
            ),
            helper.make_node("Expand", ["lm_head_fill", f"{p}/full"], [f"{p}/base"], f"{p}/Base"),
            helper.make_node(
                "Expand", ["lm_head_kept_ids", f"{p}/shape"], [f"{p}/ids"], f"{p}/Ids"
            ),
            helper.make_node(
                "ScatterElements",
                [f"{p}/base", f"{p}/ids", "logits_kept"],
                ["logits"],
                f"{p}/Scatter",
                axis=2,
            ),
        ]
    )
    save_whole(model, path)
    return TrimResult(int(rows.size), vocab, before, after)
