"""The storage URI (raykd/storage.py) against a real S3 server (moto's, on 127.0.0.1) and a local folder."""
import json
import os
from pathlib import Path

import pytest

from raykd import storage
from raykd.data.meta import check_shards, load_meta
from raykd.data.stream import validation_batches


def a_stage(folder: Path) -> Path:
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "meta.json").write_text('{"seq_len": 8}')
    (folder / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (folder / "big.bin").write_bytes(os.urandom(6 << 20))  # over the 5 MiB part size: a multipart upload
    return folder


@pytest.fixture(params=["s3", "local"])
def uri(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3")
    return str(tmp_path / "storage")


def test_a_published_stage_reads_back_whole_and_a_node_copies_it_once(uri, tmp_path):
    stage = storage.stage_uri(uri, "data-0123")
    assert not storage.is_published(stage)
    storage.publish(a_stage(tmp_path / "built"), stage)
    assert storage.is_published(stage)
    assert json.loads(storage.read_text(storage.join(stage, "meta.json"))) == {"seq_len": 8}

    copy = storage.local_copy(storage.join(stage, "tokenizer"), cache_dir=tmp_path / "node")
    assert (Path(copy) / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    if storage.is_local(uri):
        assert copy == str(Path(uri, "stages", "data-0123", "tokenizer"))  # no copy of a local folder
    else:
        assert Path(copy).is_relative_to(tmp_path / "node")
        (Path(copy) / "vocab.txt").write_text("changed")  # a second call reuses the copy, not the storage
        assert (Path(storage.local_copy(storage.join(stage, "tokenizer"), cache_dir=tmp_path / "node"))
                / "vocab.txt").read_text() == "changed"
    with storage.local_folder(stage) as folder:
        assert (Path(folder) / "big.bin").read_bytes() == (tmp_path / "built" / "big.bin").read_bytes()
        assert (Path(folder) / "tokenizer" / "vocab.txt").is_file()


def test_rows_and_paths_keep_the_scheme(uri):
    rows = storage.join(uri, "studies", "k", "trials")
    assert storage.list_files(rows, ".json") == []
    storage.write_text(storage.join(rows, "b.json"), "{}")
    storage.write_text(storage.join(rows, "a.json"), "{}")
    assert storage.list_files(rows, ".json") == [storage.join(rows, "a.json"), storage.join(rows, "b.json")]
    fs_path = storage.filesystem(storage.join(uri, "run", "checkpoint_1"))[1]
    assert storage.uri_of(uri, fs_path) == storage.join(storage.root(uri), "run", "checkpoint_1")
    with pytest.raises(ValueError, match="not inside the storage"):
        storage.uri_of(uri, "/elsewhere/checkpoint_1")


def test_an_unknown_scheme_is_named():
    with pytest.raises(ValueError, match="foo://bar"):
        storage.filesystem("foo://bar/x")


def test_shards_and_validation_batches_read_from_s3(s3, raykd_cache):
    from raykd.config import load_config
    from raykd.stages import prepare_data, publish_data

    local = prepare_data(load_config("smoke"), raykd_cache)
    meta_uri = publish_data(local, s3)
    meta = load_meta(meta_uri)
    assert meta["root"].startswith(s3 + "/stages/data-")
    assert len(check_shards(meta, "train")) == len(meta["splits"]["train"]["shards"])
    remote = [b["input_ids"] for b in validation_batches(meta_uri, 16, seed=0)]
    here = [b["input_ids"] for b in validation_batches(local, 16, seed=0)]
    assert len(remote) == len(here) and all((a == b).all() for a, b in zip(remote, here))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_meta(storage.join(s3, "stages", "nothing"))
