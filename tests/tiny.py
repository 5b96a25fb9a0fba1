"""The tiny model the tests train: its shape, and the soft prompt's length."""

# A 2-layer Llama, hidden 64, with its own BPE tokenizer (``tiny_base`` in conftest.py).
TINY = {
    "vocab_size": 400,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 128,
    "context_length": 256,
}
VIRTUAL = 8  # soft-prompt tokens of ``prompt_tuned``
