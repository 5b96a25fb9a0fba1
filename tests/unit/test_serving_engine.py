"""How the engine turns tokens into the text it streams: what is sent is never taken back (a stop
string split across tokens, an answer's trailing blank space, half a character), and the whole
answer equals what evaluation judges."""

from types import SimpleNamespace

import pytest

from lifecycle_dagster.ml.tasks import first_line
from lifecycle_dagster.serving.engine import Decoding, Job, Sampling

EOS = 0


def fake_model(pieces: list[str]):
    """A model whose token i decodes to pieces[i] (token 0: end of sequence)."""
    vocab = ["", *pieces]
    return SimpleNamespace(
        generator=SimpleNamespace(eos={EOS}),
        decode=lambda ids: "".join(vocab[i] for i in ids),
    ), {p: i + 1 for i, p in enumerate(pieces)}


def decode(pieces: list[str], tokens: list[str], **job) -> tuple[str, Decoding]:
    model, ids = fake_model(pieces)
    state = Decoding(Job(ids=[1], max_tokens=job.pop("max_tokens", 50), **job), model)
    sent = ""
    for t in tokens:
        sent += state.add(EOS if t == "<eos>" else ids[t])
        if state.reason:
            break
    return sent, state


def test_a_stop_string_across_tokens_is_never_sent():
    pieces = ["Hel", "lo ", "wor", "ld", "!"]
    sent, state = decode(pieces, ["Hel", "lo ", "wor", "ld", "!"], stop=("lo w",))
    assert sent == state.text == "Hel" and state.reason == "stop"
    sent, state = decode(pieces, ["Hel", "lo ", "wor", "ld", "!"], stop=("zz",))
    # Not ended: the last len(stop) - 1 characters wait, in case the stop string begins there.
    assert sent == "Hello world" and state.text == "Hello world!" and state.reason is None
    assert state.flush() == "!"


def test_an_answer_is_its_first_line_as_evaluation_judges_it():
    pieces = [" ", "\n", "Bus", " late", "  ", " again.", "\n", "More"]
    stream = [" ", "\n", "Bus", " late", "  ", " again.", "\n", "More"]
    sent, state = decode(pieces, stream, one_line=True)
    assert sent == state.text == first_line("".join(stream)) == "Bus late   again."
    assert state.reason == "stop"
    sent, state = decode(pieces, ["Bus", "  ", "<eos>"], one_line=True)
    assert sent == "Bus" and state.reason == "stop"  # trailing blank space never sent


def test_length_and_end_of_sequence():
    pieces = ["a", "b"]
    sent, state = decode(pieces, ["a", "b", "a", "b"], max_tokens=3)
    assert sent == "aba" and state.reason == "length" and len(state.tokens) == 3
    sent, state = decode(pieces, ["a", "<eos>", "b"])
    assert sent == "a" and state.reason == "stop" and state.tokens == [1]


def test_half_a_character_waits_for_the_rest():
    pieces = ["caf", "\ufffd", "é"]
    model, ids = fake_model(pieces)

    class Bytes:  # "é" arrives in two tokens; the first decodes to a replacement character
        eos = {EOS}

    model.generator = Bytes()
    model.decode = lambda tokens: "caf" + ("é" if len(tokens) > 2 else "\ufffd" * (len(tokens) > 1))
    state = Decoding(Job(ids=[1], max_tokens=10), model)
    assert state.add(ids["caf"]) == "caf"
    assert state.add(ids["\ufffd"]) == ""
    assert state.add(ids["é"]) == "é"


@pytest.mark.parametrize(
    ("sampling", "options"),
    [
        (Sampling(), {"do_sample": False}),
        (
            Sampling(0.7, 0.9, 5),
            {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "random_seed": 5},
        ),
    ],
)
def test_sampling_settings_and_which_requests_batch_together(sampling, options):
    assert sampling.search_options() == options
    assert Sampling().key() == Sampling(0.0, 0.5, 3).key()  # greedy ignores the rest
    assert Sampling(0.7, 0.9, 5).key() != Sampling(0.7, 0.9, 6).key()
