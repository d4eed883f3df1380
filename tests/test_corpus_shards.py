"""Corpus sources, WordPiece tokenizer, packing, Parquet shards and their metadata."""
import json
import math
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from raykd.data.corpus import load_corpus
from raykd.data.meta import check_corpus, load_meta
from raykd.data.shards import SHARD_SCHEMA, pack_sequences, prepare_corpus, shard_paths, unigram_entropy, write_split

SEQ_LEN = 32
SMALL = dict(seed=0, num_documents=300, validation_documents=40, seq_len=SEQ_LEN, vocab_size=2000,
             examples_per_shard=250)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("corpus") / "synthetic", **SMALL)


@pytest.fixture
def local_files(tmp_path):
    lines = [f"document number {i} says hello" for i in range(12)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(lines)))
    pq.write_table(pa.table({"text": lines}), tmp_path / "corpus.parquet")
    return tmp_path, lines


@pytest.mark.parametrize("name, column", [("corpus.txt", "text"), ("corpus.jsonl", "body"),
                                          ("corpus.parquet", "text")])
def test_local_files_load_through_datasets(local_files, name, column):
    root, lines = local_files
    corpus = load_corpus("files", data_files=str(root / name), text_column=column, validation_documents=3,
                         num_documents=5, cache_dir=root / "cache")
    assert corpus["train"].column_names == ["text"]
    assert corpus["train"]["text"] == lines[:5]
    assert corpus["validation"]["text"] == lines[-3:]


def test_explicit_validation_file_is_used(local_files):
    root, lines = local_files
    corpus = load_corpus("files", data_files={"train": str(root / "corpus.parquet"),
                                              "validation": str(root / "corpus.parquet")},
                         cache_dir=root / "cache")
    assert corpus["train"]["text"] == lines and corpus["validation"]["text"] == lines


def test_bad_sources_name_the_problem(local_files):
    root, _ = local_files
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_corpus("files", data_files=[str(root / "corpus.jsonl"), str(root / "missing.jsonl")])
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.txt"):
        load_corpus("files", data_files=str(root / "nothing-*.txt"))
    with pytest.raises(ValueError, match="'content'"):
        load_corpus("files", data_files=str(root / "corpus.jsonl"), text_column="content", cache_dir=root / "c")
    with pytest.raises(ValueError, match="mix formats"):
        load_corpus("files", data_files=[str(root / "corpus.txt"), str(root / "corpus.parquet")])
    with pytest.raises(ValueError, match="source"):
        load_corpus("wikipedia")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare_corpus(root / "out", "files", data_files=str(root / "missing.txt"), seed=0, num_documents=None,
                       validation_documents=1)
    with pytest.raises(FileNotFoundError, match="no-tokenizer"):
        prepare_corpus(root / "out", seed=0, num_documents=10, validation_documents=1,
                       tokenizer=str(root / "no-tokenizer"))
    assert not (root / "out").exists()  # refused before anything was built


def test_pack_sequences_hand_checked():
    cls, sep = 2, 3
    rows = np.concatenate(list(pack_sequences([[5, 6, 7], [], [8, 9], [10]], seq_len=5, cls_id=cls, sep_id=sep)))
    # stream 5 6 7 [SEP] 8 9 [SEP] 10 -> pieces of 3; the tail "[SEP] 10" is dropped
    assert rows.tolist() == [[2, 5, 6, 7, 3], [2, 3, 8, 9, 3]]
    chunks = list(pack_sequences([list(range(10, 40))] * 3, seq_len=8, cls_id=cls, sep_id=sep, rows_per_chunk=2))
    assert sum(len(c) for c in chunks) == (3 * 30 + 2) // 6 and all(c.dtype == np.int32 for c in chunks)


def test_shards_schema_lengths_special_positions_and_ids(prepared):
    meta = load_meta(prepared)
    assert meta["seq_len"] == SEQ_LEN and meta["special_ids"] == dict(pad=0, unk=1, cls=2, sep=3, mask=4)
    for split in ("train", "validation"):
        info = meta["splits"][split]
        table = pa.concat_tables(pq.read_table(p) for p in shard_paths(meta, split))
        assert table.schema.equals(SHARD_SCHEMA)
        ids = np.array(table.column("input_ids").to_pylist())
        assert ids.shape == (info["num_examples"], SEQ_LEN)
        assert (ids[:, 0] == 2).all() and (ids[:, -1] == 3).all()
        assert not np.isin(ids[:, 1:-1], [0, 2, 4]).any()  # no [PAD]/[CLS]/[MASK] inside
        assert table.column("example_id").to_pylist() == list(range(info["num_examples"]))
        assert info["num_tokens"] == info["num_examples"] * SEQ_LEN
        assert all(s["num_examples"] <= SMALL["examples_per_shard"] for s in info["shards"])
    train = meta["splits"]["train"]
    assert len(train["shards"]) == math.ceil(train["num_examples"] / SMALL["examples_per_shard"]) >= 2
    assert meta["corpus"]["source"] == "synthetic" and meta["corpus"]["seed"] == 0


def test_packing_keeps_the_text_contiguous(prepared):
    """Decoding the train shards gives back the corpus documents, in order."""
    meta = load_meta(prepared)
    tok = AutoTokenizer.from_pretrained(os.path.join(meta["root"], meta["tokenizer"]))
    first = pq.read_table(shard_paths(meta, "train")[0]).column("input_ids").to_pylist()[:3]
    stream = [t for row in first for t in row[1:-1]]
    from raykd.data.corpus import synthetic_texts
    expected = tok(next(synthetic_texts(0, 0, 1)), add_special_tokens=False)["input_ids"]
    assert stream[: len(expected)] == expected[: len(stream)]


def test_tokenizer_round_trip_with_autotokenizer(prepared):
    meta = load_meta(prepared)
    tok = AutoTokenizer.from_pretrained(os.path.join(meta["root"], meta["tokenizer"]))
    assert len(tok) == meta["vocab_size"] and tok.mask_token_id == 4 and tok.pad_token_id == 0
    from raykd.data.corpus import synthetic_texts
    text = next(synthetic_texts(0, 5, 1)).split(" . ")[0] + " ."
    enc = tok(text, text.upper())
    n = len(tok(text)["input_ids"])
    assert enc["input_ids"][0] == 2 and enc["input_ids"][n - 1] == 3 and enc["input_ids"][-1] == 3
    assert enc["token_type_ids"] == [0] * n + [1] * (len(enc["input_ids"]) - n)  # lower-cased: same tokens
    words = []
    for piece in tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"]):
        if piece.startswith("##"):
            words[-1] += piece[2:]
        else:
            words.append(piece)
    assert " ".join(words) == text
    assert tok.unk_token_id not in enc["input_ids"]


def test_prepare_is_idempotent_and_refuses_other_parameters(prepared):
    shard = shard_paths(load_meta(prepared), "train")[0]
    before = (prepared.stat().st_mtime_ns, shard.stat().st_mtime_ns)
    assert prepare_corpus(prepared.parent, **SMALL) == prepared
    assert (prepared.stat().st_mtime_ns, shard.stat().st_mtime_ns) == before
    with pytest.raises(ValueError, match="seq_len"):
        prepare_corpus(prepared.parent, **{**SMALL, "seq_len": 64})


def test_files_source_with_a_given_tokenizer(prepared, local_files):
    root, _ = local_files
    tokenizer_dir = os.path.join(load_meta(prepared)["root"], "tokenizer")
    meta_path = prepare_corpus(root / "out", "files", data_files=str(root / "corpus.jsonl"), text_column="body",
                               tokenizer=tokenizer_dir, seed=0, validation_documents=4, num_documents=None, seq_len=8)
    meta = load_meta(meta_path)
    assert meta["corpus"]["source"] == "files" and meta["splits"]["validation"]["num_examples"] >= 1
    assert AutoTokenizer.from_pretrained(root / "out" / "tokenizer").get_vocab() == \
        AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()
    assert not [p for p in (root / "out").iterdir() if p.name.startswith(".")]  # work files cleaned up


def test_missing_and_corrupt_shards_name_the_file(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared.parent, copy)
    shard = copy / "train" / "shard-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="shard-00001.parquet"):
        check_corpus(load_meta(copy))
    shard.write_bytes(data)
    check_corpus(load_meta(copy))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.parquet"):
        check_corpus(load_meta(copy / "meta.json"))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_meta(tmp_path / "nowhere")


def test_unigram_entropy_hand_checked(tmp_path):
    rows = np.array([[2, 5, 5, 6, 3], [2, 7, 0, 5, 3]], dtype=np.int32)  # 5 x3, 6 x1, 7 x1; specials ignored
    info = write_split([rows], tmp_path, "train", examples_per_shard=10)
    write_split([rows[:1]], tmp_path, "validation", examples_per_shard=10)
    (tmp_path / "tokenizer").mkdir()
    meta = {"seq_len": 5, "vocab_size": 8, "special_ids": dict(pad=0, unk=1, cls=2, sep=3, mask=4),
            "tokenizer": "tokenizer",
            "splits": {"train": {**info, "num_tokens": 10},
                       "validation": {"num_examples": 1, "num_tokens": 5,
                                      "shards": [{"path": "validation/shard-00000.parquet", "num_examples": 1,
                                                  "first_example_id": 0}]}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    p = np.array([3, 1, 1]) / 5
    assert unigram_entropy(tmp_path) == pytest.approx(-(p * np.log(p)).sum())


def test_synthetic_corpus_entropy_is_in_a_learnable_range(prepared):
    h = unigram_entropy(prepared)
    assert 4.0 < h < 7.0  # nats; a few thousand Zipf-distributed words
