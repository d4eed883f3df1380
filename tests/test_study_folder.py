"""The study folder: bound to its configuration, held by one driver, rows durable, damage named and rerun;
stage caches keyed by the data's content."""
import json
import os
import signal
import subprocess
import sys

import pytest

from raykd.config import ConfigError, load_config
from raykd.stages import data_key
from raykd.study_folder import (DAMAGED_DIR, LOCK_FILE, TRIALS_DIR, check_binding, finished_rows, hold,
                                record_study, write_row)
from raykd.plan import number_key, trial_id


def test_resume_under_another_configuration_names_every_differing_field(tmp_path):
    record_study(tmp_path, load_config("smoke"), key="k")
    check_binding(tmp_path, load_config("smoke", overrides=["sweep.max_concurrent_trials=1"]), resume=True)
    with pytest.raises(ConfigError) as error:
        check_binding(tmp_path, load_config("smoke", overrides=["student.hidden=128", "budgets=[3e10, 6e10]"]),
                      resume=True)
    assert error.value.field == "--resume"
    assert "student.hidden: 64 in the study, 128 now" in str(error.value)
    assert "budgets: [30000000000.0] in the study, [30000000000.0, 60000000000.0] now" in str(error.value)


def test_a_second_driver_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; from raykd.study_folder import hold\n"
                               f"with hold(Path({str(tmp_path)!r}), 'holder'):\n"
                               "    print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"in use by another driver \\(holder, pid {holder.pid},"):
        with hold(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # the file stays; the kernel dropped the lock with the process
    with hold(tmp_path, "next"):
        with hold(tmp_path):  # re-entrant within one driver (grid.py holds it, run_study takes it again)
            assert "next, pid" in (tmp_path / LOCK_FILE).read_text()


def test_budgets_that_print_alike_get_distinct_trial_ids():
    assert f"{3.0000001e10:g}" == f"{3.0000002e10:g}"  # what used to collide
    ids = {trial_id("scratch", budget, 2.0, 0) for budget in (3.0000001e10, 3.0000002e10, 3e10)}
    assert len(ids) == 3
    assert trial_id("scratch", 3e10, 2.0, 0) == "scratch-b3e+10-r2-s0"  # short where it is exact
    assert float(number_key(3.0000001e10)) == 3.0000001e10 and float(number_key(1 / 3)) == 1 / 3


def test_row_writes_are_fsynced_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spying_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spying_fsync)
    write_row(tmp_path, {"trial_id": "scratch-b3e+10-r2-s0", "glue_score": 1.0})
    folder = tmp_path / TRIALS_DIR
    assert any(path.startswith(str(folder / ".scratch-b3e+10-r2-s0.json.tmp")) for path in synced)  # the content
    assert str(folder) in synced  # the rename
    assert json.loads((folder / "scratch-b3e+10-r2-s0.json").read_text())["glue_score"] == 1.0


@pytest.mark.parametrize("content,reason", [(b"", "empty file"), (b'{"trial_id": "minilm', "Unterminated string"),
                                            (b'{"trial_id": "other"}', "not the row of trial")])
def test_a_damaged_row_is_named_set_aside_and_its_cell_runs_again(tmp_path, capsys, content, reason):
    write_row(tmp_path, {"trial_id": "scratch-b3e+10-r2-s0"})
    damaged = tmp_path / TRIALS_DIR / "minilm-b3e+10-r2-s0.json"
    damaged.write_bytes(content)
    rows = finished_rows(tmp_path)
    assert [row["trial_id"] for row in rows] == ["scratch-b3e+10-r2-s0"]  # minilm's cell is not done: it reruns
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(damaged) in err[0] and reason in err[0], err
    assert not damaged.exists()
    [kept] = (tmp_path / TRIALS_DIR / DAMAGED_DIR).iterdir()
    assert kept.read_bytes() == content  # set aside, not deleted
    assert finished_rows(tmp_path) == rows and capsys.readouterr().err == ""  # named once


def test_the_corpus_cache_follows_the_files_content(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat\n" * 50)
    config = load_config("smoke", overrides=["data.source=files", f"data.data_files=[{corpus}]"])
    before, stat = data_key(config.data), corpus.stat()
    assert data_key(config.data) == before
    corpus.write_text("the dog sat\n" * 50)  # rewritten in place: same path, same size, other lines
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and even the old mtime
    assert corpus.stat().st_size == stat.st_size and data_key(config.data) != before
