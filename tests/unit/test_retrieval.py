"""Retrieval: documents read (and refused with file, line and field), chunked, indexed with BM25
and found again; the index's version follows the documents; what a prompt gets and what recall
and groundedness measure."""

import json

import pytest

from lifecycle_dagster.ml import catalogue
from lifecycle_dagster.ml.errors import InputError
from lifecycle_dagster.ml.retrieval import (
    PASSAGES_FIELD,
    Document,
    RetrievalSpec,
    Retriever,
    augment,
    build_index,
    chunk,
    digest,
    groundedness,
    load_documents,
    passages_for,
    recall_at_k,
)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The catalogue use case's documents and questions, written as the package ships them."""
    folder = tmp_path_factory.mktemp("catalogue")
    catalogue.write(folder)
    return folder


@pytest.fixture(scope="module")
def index(shipped, tmp_path_factory):
    out = tmp_path_factory.mktemp("index")
    info = build_index(load_documents(shipped / "docs"), RetrievalSpec(documents="docs"), out)
    return out, info


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bm25_finds_the_document_that_answers_each_question(shipped, index):
    folder, info = index
    assert info.documents == 60 and info.chunks >= 60 and info.bytes > 0
    retriever = Retriever(folder)
    rows = read(shipped / "data" / "eval.jsonl")
    for row in rows:
        row[PASSAGES_FIELD] = passages_for(retriever, row["question"], 2)
    recall = recall_at_k(rows, "doc_id")
    assert recall is not None and recall >= 0.95, recall
    # the answer itself is in what the prompt gets
    found = sum(
        r["answer"].lower() in " ".join(p["text"] for p in r[PASSAGES_FIELD]).lower() for r in rows
    )
    assert found / len(rows) >= 0.9
    assert recall_at_k([{**r, "doc_id": "nowhere"} for r in rows], "doc_id") == 0.0


def test_no_fact_is_asked_in_both_splits(shipped):
    train, evals = (read(shipped / "data" / f"{s}.jsonl") for s in ("train", "eval"))
    assert not {r["question"] for r in train} & {r["question"] for r in evals}
    assert len(train) + len(evals) == 60 * len(catalogue.QUESTIONS)


def test_a_changed_document_changes_the_index_version(shipped, tmp_path):
    docs = load_documents(shipped / "docs")
    spec = RetrievalSpec(documents="docs")
    assert digest(docs, spec) == digest(load_documents(shipped / "docs"), spec)
    edited = [
        Document(d.id, d.title, d.text + " Updated.") if i == 0 else d for i, d in enumerate(docs)
    ]
    assert digest(edited, spec) != digest(docs, spec)
    assert digest(docs, spec.model_copy(update={"chunk_words": 40})) != digest(docs, spec)


def test_chunks_overlap_and_carry_their_title():
    doc = Document("d", "Kestrel X4", "# Kestrel X4\n\n" + " ".join(f"w{i}" for i in range(100)))
    parts = chunk(doc, words=40, overlap=10)
    assert [c.id for c in parts] == ["d#0", "d#1", "d#2", "d#3"]
    assert parts[1].text.startswith("Kestrel X4: ")
    first, second = (p.text.removeprefix("Kestrel X4: ").split() for p in parts[:2])
    assert first[-10:] == second[:10]
    assert " ".join(parts[-1].text.split()[-1:]) == "w99"


def test_bad_documents_are_refused_naming_the_file_line_and_field(tmp_path):
    with pytest.raises(InputError, match="do not exist"):
        load_documents(tmp_path / "missing")
    (tmp_path / "docs").mkdir()
    with pytest.raises(InputError, match="no .md/.txt/.markdown documents"):
        load_documents(tmp_path / "docs")
    (tmp_path / "docs" / "a.md").write_text("  \n")
    with pytest.raises(InputError, match=r"a\.md: the document is empty"):
        load_documents(tmp_path / "docs")
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b"}\n')
    with pytest.raises(InputError, match=r"docs\.jsonl:2: field 'text': missing or empty"):
        load_documents(bad)
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(InputError, match="'a' occurs twice"):
        load_documents(bad)


def test_passages_enter_the_input_as_the_template_says():
    passages = [{"text": "The Kestrel X4 weighs 380 grams."}, {"text": "Warranty: 3 years."}]
    text = augment("Passages:\n{passages}\n\n{input}", "How heavy is it?", passages)
    assert text == (
        "Passages:\n[1] The Kestrel X4 weighs 380 grams.\n[2] Warranty: 3 years.\n\n"
        "How heavy is it?"
    )
    assert groundedness("380 grams", passages) == 1.0
    assert groundedness("about 400 grams", passages) == pytest.approx(1 / 3)
    assert groundedness("the", passages) is None


def test_dense_retrieval_encodes_chunks_and_queries_with_a_local_encoder(shipped, tmp_path):
    """The dense path end to end on a small BERT built here (random weights: the mechanics, not
    the ranking): safetensors weights from a local directory, one normalised vector per chunk,
    searched by cosine; a directory without a model is refused naming the field."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = sorted({w for d in load_documents(shipped / "docs") for w in d.text.lower().split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    encoder = tmp_path / "encoder"
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]"
    ).save_pretrained(encoder)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    BertModel(config).save_pretrained(encoder)
    assert (encoder / "model.safetensors").exists()
    spec = RetrievalSpec(documents="docs", method="dense", embedding_model=str(encoder))
    info = build_index(load_documents(shipped / "docs"), spec, tmp_path / "index")
    assert info.extra["dimensions"] == 32
    vectors = np.load(tmp_path / "index" / "vectors.npy")
    assert vectors.shape == (info.chunks, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    found = Retriever(tmp_path / "index").search("battery life of the Kestrel", 3)
    assert len(found) == 3 and found[0][1] >= found[-1][1]
    with pytest.raises(ValueError, match="embedding_model: .* has no config.json"):
        build_index(
            load_documents(shipped / "docs"),
            spec.model_copy(update={"embedding_model": str(tmp_path)}),
            tmp_path / "x",
        )
    with pytest.raises(ValueError, match="needs embedding_model"):
        RetrievalSpec(documents="docs", method="dense")
