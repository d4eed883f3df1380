"""Corpus -> tokenizer -> fixed-length sequences -> Parquet shards (SPEC §4).

Layout of a prepared corpus directory:

    meta.json                       written last; describes everything below
    tokenizer/                      HF tokenizer directory (AutoTokenizer loads it)
    train/shard-00000.parquet ...   columns example_id (int64), input_ids (list<int32>)
    validation/shard-00000.parquet ...

Each sequence is [CLS] + seq_len-2 tokens + [SEP], cut from the documents'
token stream with [SEP] between documents; the incomplete tail is dropped.
example_id runs from 0, contiguous within a split, in shard order.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykd.data.corpus import VALIDATION_DOCUMENT_OFFSET, check_source, load_corpus
from raykd.data.meta import META_FILE, SPLITS, check_corpus, load_meta
from raykd.data.synthetic import DEFAULT_NUM_WORDS, SyntheticLanguage
from raykd.data.tokenizer import load_tokenizer, special_ids, train_wordpiece
from raykd.io import atomic_path, atomic_write_text

TOKENIZER_DIR = "tokenizer"
SHARD_SCHEMA = pa.schema([("example_id", pa.int64()), ("input_ids", pa.list_(pa.int32()))])
_ENCODE_BATCH = 1000


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer, batched, without length warnings
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def pack_sequences(documents: Iterable[list[int]], seq_len: int, cls_id: int, sep_id: int,
                   rows_per_chunk: int = 1024) -> Iterator[np.ndarray]:
    """Pack token lists into int32 arrays of shape (n, seq_len): the documents'
    tokens joined by [SEP], cut into seq_len-2 pieces, each framed as
    [CLS] piece [SEP]. Yields chunks of up to rows_per_chunk rows; the last
    incomplete piece is dropped."""
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3, got {seq_len}")
    body = seq_len - 2
    pending: list[int] = []
    for ids in documents:
        if not ids:
            continue
        if pending:
            pending.append(sep_id)
        pending.extend(ids)
        if len(pending) >= body * rows_per_chunk:
            n = len(pending) // body
            yield _frame(np.asarray(pending[: n * body], dtype=np.int32).reshape(n, body), cls_id, sep_id)
            pending = pending[n * body:]
    n = len(pending) // body
    if n:
        yield _frame(np.asarray(pending[: n * body], dtype=np.int32).reshape(n, body), cls_id, sep_id)


def _frame(body: np.ndarray, cls_id: int, sep_id: int) -> np.ndarray:
    out = np.empty((body.shape[0], body.shape[1] + 2), dtype=np.int32)
    out[:, 0], out[:, -1], out[:, 1:-1] = cls_id, sep_id, body
    return out


def _shard_table(rows: np.ndarray, first_id: int) -> pa.Table:
    n, seq_len = rows.shape
    offsets = pa.array(np.arange(0, (n + 1) * seq_len, seq_len, dtype=np.int32))
    input_ids = pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1)))
    example_id = pa.array(np.arange(first_id, first_id + n, dtype=np.int64))
    return pa.Table.from_arrays([example_id, input_ids], schema=SHARD_SCHEMA)


def write_split(chunks: Iterable[np.ndarray], out_dir: Path, split: str, examples_per_shard: int) -> dict:
    """Write packed rows as out_dir/split/shard-NNNNN.parquet; return the split's metadata."""
    split_dir = out_dir / split
    shutil.rmtree(split_dir, ignore_errors=True)
    split_dir.mkdir(parents=True)
    shards, buffer, buffered, next_id = [], [], 0, 0

    def flush(rows: np.ndarray) -> None:
        nonlocal next_id
        rel = f"{split}/shard-{len(shards):05d}.parquet"
        path = out_dir / rel
        with atomic_path(path) as staging:
            pq.write_table(_shard_table(rows, next_id), staging)
        shards.append({"path": rel, "num_examples": int(rows.shape[0]), "first_example_id": next_id})
        next_id += int(rows.shape[0])

    for chunk in chunks:
        buffer.append(chunk)
        buffered += chunk.shape[0]
        while buffered >= examples_per_shard:
            rows = np.concatenate(buffer)
            flush(rows[:examples_per_shard])
            rest = rows[examples_per_shard:]
            buffer, buffered = [rest], rest.shape[0]
    if buffered:
        flush(np.concatenate(buffer))
    return {"num_examples": next_id, "shards": shards}


def _params(**kwargs) -> dict:
    """The recorded parameters, normalised through JSON so a reread compares equal."""
    return json.loads(json.dumps(kwargs, default=str))


def prepare_corpus(out_dir: str | Path, source: str = "synthetic", *, seed: int, num_documents: int | None,
                   validation_documents: int, num_words: int = DEFAULT_NUM_WORDS, seq_len: int = 128,
                   vocab_size: int = 8192, tokenizer: str | None = None, text_column: str = "text",
                   data_files: str | list[str] | dict | None = None, dataset_name: str | None = None,
                   dataset_config: str | None = None, dataset_split: str = "train",
                   examples_per_shard: int = 8192) -> Path:
    """Build (or reuse) a prepared corpus in out_dir; return the path of meta.json.

    tokenizer=None trains WordPiece (vocab_size) on the train split; otherwise
    it names an HF tokenizer (hub name or directory), copied into out_dir.
    num_documents: train documents (required for "synthetic"; None = all rows
    of a file or `datasets` source). validation_documents: held-out documents
    (synthetic: ids from VALIDATION_DOCUMENT_OFFSET; otherwise the last rows,
    unless data_files gives a "validation" split).
    If out_dir/meta.json exists with the same parameters it is validated and
    returned without recomputing; with different parameters, a ValueError.
    """
    out_dir = Path(out_dir)
    check_source(source, seed=seed, num_documents=num_documents, validation_documents=validation_documents,
                 num_words=num_words, data_files=data_files, dataset_name=dataset_name)
    for name, value, low in (("seq_len", seq_len, 8), ("vocab_size", vocab_size, 64),
                             ("examples_per_shard", examples_per_shard, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    params = _params(source=source, seed=seed, num_documents=num_documents, validation_documents=validation_documents,
                     seq_len=seq_len, vocab_size=vocab_size, tokenizer=tokenizer, text_column=text_column,
                     data_files=data_files, dataset_name=dataset_name, dataset_config=dataset_config,
                     dataset_split=dataset_split, examples_per_shard=examples_per_shard,
                     # The lexicon size shapes only the synthetic language.
                     **({"num_words": num_words} if source == "synthetic" else {}))
    meta_path = out_dir / META_FILE
    if meta_path.exists():
        recorded = json.loads(meta_path.read_text()).get("params")
        if recorded == params:
            check_corpus(load_meta(meta_path))
            return meta_path
        differing = sorted(k for k in set(params) | set(recorded or {}) if (recorded or {}).get(k) != params.get(k))
        raise ValueError(f"{meta_path} was prepared with other parameters ({differing}); use another out_dir")
    given_tokenizer = None if tokenizer is None else load_tokenizer(tokenizer)  # fail before the corpus is built
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".work-") as work:
        # Local sources are converted to Arrow in a temporary cache; hub datasets use the usual HF cache.
        cache_dir = None if source == "datasets" else Path(work) / "hf_cache"
        corpus = load_corpus(source, seed=seed, num_documents=num_documents, validation_documents=validation_documents,
                             num_words=num_words,
                             text_column=text_column, data_files=data_files, dataset_name=dataset_name,
                             dataset_config=dataset_config, split=dataset_split, work_dir=work, cache_dir=cache_dir)
        tokenizer_dir = out_dir / TOKENIZER_DIR
        if given_tokenizer is None:
            tok = train_wordpiece((b["text"] for b in corpus["train"].iter(batch_size=_ENCODE_BATCH)),
                                  vocab_size, tokenizer_dir, model_max_length=seq_len)
        else:
            tok = given_tokenizer
            shutil.rmtree(tokenizer_dir, ignore_errors=True)
            tok.save_pretrained(tokenizer_dir)
        ids = special_ids(tok)
        splits = {}
        for split in SPLITS:
            docs = (ids_ for b in corpus[split].iter(batch_size=_ENCODE_BATCH) for ids_ in _encode(tok, b["text"]))
            info = write_split(pack_sequences(docs, seq_len, ids["cls"], ids["sep"]), out_dir, split,
                               examples_per_shard)
            if info["num_examples"] == 0:
                raise ValueError(f"the {split} split yields no full sequence of seq_len={seq_len} tokens; "
                                 f"give it more documents")
            splits[split] = {"num_examples": info["num_examples"], "num_tokens": info["num_examples"] * seq_len,
                             "shards": info["shards"]}
    meta = {"seq_len": seq_len, "vocab_size": len(tok), "special_ids": ids, "tokenizer": TOKENIZER_DIR,
            "corpus": _describe(params), "params": params, "splits": splits}
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return meta_path


def _describe(params: dict) -> dict:
    if params["source"] == "synthetic":
        lang = SyntheticLanguage(params["seed"], params["num_words"])
        n, v = params["num_documents"], params["validation_documents"]
        return {"source": "synthetic", "seed": params["seed"], "num_words": lang.num_words,
                "num_topics": lang.num_topics, "train_document_ids": [0, n],
                "validation_document_ids": [VALIDATION_DOCUMENT_OFFSET, VALIDATION_DOCUMENT_OFFSET + v]}
    keys = ("data_files",) if params["source"] == "files" else ("dataset_name", "dataset_config", "dataset_split")
    return {"source": params["source"], **{k: params[k] for k in keys}, "text_column": params["text_column"],
            "num_documents": params["num_documents"], "validation_documents": params["validation_documents"]}


def shard_paths(meta: dict, split: str) -> list[Path]:
    """Absolute shard paths of a split, in example-id order (meta from load_meta)."""
    return [Path(meta["root"]) / s["path"] for s in meta["splits"][split]["shards"]]


def unigram_entropy(meta_path: str | Path, split: str = "train") -> float:
    """Entropy (nats) of the unigram distribution of non-special tokens in a
    split: the loss of a model that ignores context, for the masked positions."""
    meta = load_meta(meta_path)
    counts = np.zeros(meta["vocab_size"], dtype=np.int64)
    for path in shard_paths(meta, split):
        values = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks().values
        counts += np.bincount(values.to_numpy(), minlength=meta["vocab_size"])[: meta["vocab_size"]]
    counts[list(meta["special_ids"].values())] = 0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
