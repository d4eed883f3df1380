"""Atomic writes: a reader sees the old content or the whole new one, and no staging file is left."""
import pytest

from raykd.io import atomic_path, atomic_write_text


def test_atomic_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "deep" / "row.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["row.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_staging(tmp_path):
    path = tmp_path / "results.parquet"
    path.write_text("finished rows")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as staging:
            staging.write_text("half a file")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "finished rows"
    assert [p.name for p in tmp_path.iterdir()] == ["results.parquet"]


def test_a_folder_is_published_whole(tmp_path):
    out = tmp_path / "tokenizer"
    with atomic_path(out) as staging:
        staging.mkdir()
        (staging / "vocab.txt").write_text("[PAD]\n")
        assert not out.exists()  # nothing visible until the block ends
    assert (out / "vocab.txt").read_text() == "[PAD]\n"
