"""Bad input at every entry point: exit 2, one line naming the field or file, before Ray or a corpus.

Each probe runs an entry script as a user would, in a subprocess, through a
small wrapper that records which heavy libraries the script had imported when
it exited: a probe passes only if the script refused the input before
importing Ray, torch or transformers (which is what makes it fast), left no
Ray session under its own RAY_TMPDIR, built no corpus in its own cache, and
printed no traceback. The probes run in parallel; each one's wall time is
recorded in its failure message.
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from raykd.config import load_config
from raykd.study_folder import hold, record_study, write_row

REPO = Path(__file__).resolve().parent.parent

# Runs `script` (a file, or -m module) with argv and writes the heavy modules it imported to `report`.
WRAPPER = """
import json, runpy, sys
report, script, *argv = sys.argv[1:]
sys.argv = [script, *argv]
code = 0
try:
    if script.endswith(".py"):
        runpy.run_path(script, run_name="__main__")
    else:
        runpy.run_module(script, run_name="__main__", alter_sys=True)
except SystemExit as stop:
    code = stop.code
with open(report, "w") as out:
    json.dump(sorted(m for m in ("ray", "torch", "transformers") if m in sys.modules), out)
sys.exit(code)
"""

SCRIPTS = {"grid": "sweeps/grid.py", "tune": "sweeps/tune_lr.py", "pretrain": "sweeps/pretrain.py",
           "report": "analysis.report", "sensitivity": "bench/task_sensitivity.py"}
PREFIX = {"grid": "grid.py", "tune": "tune_lr.py", "pretrain": "pretrain.py", "report": "report",
          "sensitivity": "task_sensitivity.py"}

# (id, script, arguments, what the message must name: one string or several). In arguments, {files} is the
# folder of prepared bad files (see `bad_files`).
PROBES = [
    ("yaml-unclosed-list", "grid", ["budgets=[1e12"], "budgets"),
    ("budget-inf", "grid", ["budgets=[inf]"], "budgets"),
    ("repetition-inf", "grid", ["repetitions=[inf]"], "repetitions"),
    ("lr-inf", "grid", ["train.lr=inf"], "train.lr"),
    ("lr-nan", "grid", ["train.lr=.nan"], "train.lr"),
    ("out-is-a-file", "grid", ["--out", "{files}/a-file"], "--out"),
    ("out-uncreatable", "grid", ["--out", "/dev/null/x"], "--out"),
    ("storage-unknown-scheme", "grid", ["--storage", "foo://bar"], "--storage"),
    ("storage-no-bucket", "grid", ["--storage", "s3://"], "--storage"),
    ("storage-is-a-file", "grid", ["--storage", "{files}/a-file"], "--storage"),
    ("cache-dir-is-a-file", "grid", ["--cache-dir", "{files}/a-file"], "--cache-dir"),
    ("seed-negative", "grid", ["seeds=[-1]"], "seeds"),
    ("seed-inf", "grid", ["seeds=[inf]"], "seeds"),
    ("dropout-5", "grid", ["train.dropout=5"], "train.dropout"),
    ("betas-one-value", "grid", ["train.betas=[0.9]"], "train.betas"),
    ("worker-cpus-negative", "grid", ["train.cpus_per_worker=-1"], "train.cpus_per_worker"),
    ("actor-cpus-negative", "grid", ["teacher.actor_cpus=-0.5"], "teacher.actor_cpus"),
    ("ray-cpus-0", "grid", ["sweep.ray_cpus=0"], "sweep.ray_cpus"),
    ("max-concurrent-0", "grid", ["sweep.max_concurrent_trials=0"], "sweep.max_concurrent_trials"),
    ("duplicate-strategy", "grid", ["strategies=[scratch, minilm, scratch]"], "strategies"),
    ("duplicate-budget", "grid", ["budgets=[3e10, 3.0e10]"], "budgets"),
    ("duplicate-seed", "grid", ["seeds=[0, 0]"], "seeds"),
    ("unknown-strategy", "grid", ["strategies=[scratch, distil]"], "strategies"),
    ("budget-zero", "grid", ["budgets=[0]"], "budgets"),
    ("budget-below-one-step", "grid", ["budgets=[1e6]"], "budgets"),
    ("repetition-below-1", "grid", ["repetitions=[0.5]"], "repetitions"),
    ("unknown-budget-unit", "grid", ["budget_unit=joules"], "budget_unit"),
    ("tinybert-head-mismatch", "grid", ["teacher.shape={layers: 2, hidden: 128, heads: 4, intermediate: 512}"],
     "teacher.shape.heads"),
    ("minilm-relation-heads", "grid", ["strategy_options.relation_heads=3"], "strategy_options.relation_heads"),
    ("tinybert-layer-map", "grid", ["strategy_options.layer_map=[1, 5]"], "strategy_options.layer_map"),
    ("unknown-task", "grid", ["eval.tasks=[syn_cola, squad]"], "eval.tasks"),
    ("files-without-files", "grid", ["data.source=files"], "data.data_files"),
    ("teacher-vocab-too-small", "grid", ["teacher.source={files}/small-vocab-teacher"], "data.vocab_size"),
    ("teacher-positions-too-few", "grid", ["teacher.source={files}/short-teacher"], "data.seq_len"),
    ("teacher-missing", "grid", ["teacher.source=/nonexistent/teacher"], "teacher.source"),
    ("empty-text-file", "grid", ["data.source=files", "data.data_files=[{files}/empty.txt]"], "empty.txt"),
    ("random-bytes-parquet", "grid", ["data.source=files", "data.data_files=[{files}/random.parquet]"],
     "random.parquet"),
    ("jsonl-without-text-column", "grid", ["data.source=files", "data.data_files=[{files}/docs.jsonl]"],
     "data.text_column"),
    ("missing-data-file", "grid", ["data.source=files", "data.data_files=[{files}/absent.txt]"], "absent.txt"),
    ("unreachable-hub-dataset", "grid", ["data.source=hub", "data.dataset_name=nobody/no-such-corpus"],
     "data.dataset_name"),
    ("missing-config-file", "grid", ["--config", "{files}/absent.yaml"], "absent.yaml"),
    ("config-not-yaml", "grid", ["--config", "{files}/broken.yaml"], "broken.yaml"),
    ("unknown-field", "grid", ["train.lrr=1e-3"], "train.lrr"),
    ("wrong-type", "grid", ["student.hidden=wide"], "student.hidden"),
    ("override-without-value", "grid", ["train.lr"], "train.lr"),
    ("unknown-preset", "grid", ["--preset", "huge"], "--preset"),
    ("name-with-slash", "grid", ["name=../elsewhere"], "name"),
    ("mask-prob-above-1", "grid", ["data.mask_prob=1.5"], "data.mask_prob"),
    ("missing-lr-file", "grid", ["train.lr_file=/nonexistent/tuned.json"], "train.lr_file"),
    ("tune-budget-below-one-step", "tune", ["budgets=[1]"], "budgets"),
    ("tune-lr-range-reversed", "tune", ["tune.lr_min=1e-2"], "tune.lr_min"),
    ("tune-budget-fraction-0", "tune", ["tune.budget_fraction=0"], "tune.budget_fraction"),
    ("tune-trials-0", "tune", ["tune.trials=0"], "tune.trials"),
    ("tune-out-is-a-file", "tune", ["--out", "{files}/a-file"], "--out"),
    ("pretrain-budget-below-one-step", "pretrain", ["--budget", "1000"], "budgets"),
    ("pretrain-budget-inf", "pretrain", ["--budget", "inf"], "budgets"),
    ("pretrain-unknown-strategy", "pretrain", ["--strategy", "distil"], "strategies"),
    ("pretrain-repetition-0", "pretrain", ["--repetition", "0"], "repetitions"),
    ("pretrain-workers-0", "pretrain", ["train.workers=0"], "train.workers"),
    ("pretrain-cache-dir-uncreatable", "pretrain", ["--cache-dir", "/dev/null/x"], "--cache-dir"),
    ("resume-other-lr", "grid", ["--out", "{files}/study", "--resume", "train.lr=1e-4"], ("--resume", "train.lr")),
    ("resume-other-width-and-lr", "grid", ["--out", "{files}/study", "--resume", "student.hidden=128", "train.lr=1e-4"],
     ("--resume", "student.hidden", "train.lr")),
    ("new-study-over-finished-rows", "grid", ["--out", "{files}/study"], ("--out", "--resume")),
    ("resume-unreadable-study-record", "grid", ["--out", "{files}/broken-study", "--resume"], "study.json"),
    ("second-driver", "grid", ["--out", "{files}/locked"], ("--out", "in use by another driver")),
    ("second-tuner", "tune", ["--out", "{files}/locked"], ("--out", "in use by another driver")),
    ("report-out-uncreatable", "report", ["{files}", "--out", "/dev/null/x"], "--out"),
    ("report-out-is-a-file", "report", ["{files}", "--out", "{files}/a-file"], "--out"),
    ("report-missing-folder", "report", ["{files}/absent-sweep"], "absent-sweep"),
    ("report-no-results", "report", ["{files}"], "results.parquet"),
    ("sensitivity-missing-study", "sensitivity", ["{files}/absent-study"], "absent-study"),
    ("sensitivity-unknown-task", "sensitivity", ["{files}/gone-student", "--tasks", "syn_foo"], ("--tasks", "syn_foo")),
    ("sensitivity-cache-dir-is-a-file", "sensitivity", ["{files}/gone-student", "--cache-dir", "{files}/a-file"],
     "--cache-dir"),
    ("sensitivity-student-gone", "sensitivity", ["{files}/gone-student"], ("scratch-b5.1e+12-r1-s0", "is gone")),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """The files the probes name: an empty text file, random bytes called Parquet, teachers that do not fit."""
    from transformers import BertConfig

    files = tmp_path_factory.mktemp("bad-files")
    (files / "a-file").write_text("not a folder\n")
    (files / "empty.txt").write_text("\n\n")
    (files / "random.parquet").write_bytes(os.urandom(4096))
    (files / "docs.jsonl").write_text(json.dumps({"body": "a document"}) + "\n")
    (files / "broken.yaml").write_text("train: {lr: [1e-3\n")
    smoke_teacher = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512)
    BertConfig(vocab_size=1000, max_position_embeddings=512, **smoke_teacher).save_pretrained(
        files / "small-vocab-teacher")
    BertConfig(vocab_size=4096, max_position_embeddings=32, **smoke_teacher).save_pretrained(files / "short-teacher")
    study = files / "study"  # a smoke study with one finished row
    study.mkdir()
    record_study(study, load_config("smoke"), key="probe")
    write_row(study, {"trial_id": "scratch-b3e+10-r2-s0", "strategy": "scratch"})
    (files / "broken-study").mkdir()
    (files / "broken-study" / "study.json").write_text("")
    gone = files / "gone-student"  # a finished local study whose student checkpoint was deleted
    gone.mkdir()
    record_study(gone, load_config("local"), key="probe")
    pd.DataFrame([{"trial_id": "scratch-b5.1e+12-r1-s0", "strategy": "scratch", "budget_unit": "flops", "budget": 5.1e12,
                   "repetition": 1.0, "seed": 0, "checkpoint": str(files / "deleted" / "student")}]).to_parquet(
        gone / "results.parquet")
    return files


def _run_probe(probe, files: Path, scratch: Path) -> dict:
    name, script, arguments, _ = probe
    tmp = scratch / name
    tmp.mkdir()
    args = [a.replace("{files}", str(files)) for a in arguments]
    preset = [] if script in ("report", "sensitivity") or "--preset" in args else ["--preset", "smoke"]
    out = [] if script in ("report", "pretrain", "sensitivity") or "--out" in args else ["--out", str(tmp / "out")]
    cache = [] if script == "report" or "--cache-dir" in args else ["--cache-dir", str(tmp / "cache")]
    env = {**os.environ, "RAY_TMPDIR": str(tmp / "ray"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    target = SCRIPTS[script] if script == "report" else str(REPO / SCRIPTS[script])
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", WRAPPER, str(tmp / "imported.json"), target,
                          *preset, *cache, *out, *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    imported = json.loads((tmp / "imported.json").read_text()) if (tmp / "imported.json").exists() else None
    return {"run": run, "seconds": seconds, "imported": imported, "tmp": tmp}


@pytest.fixture(scope="module")
def probe_runs(bad_files, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("probes")
    with hold(bad_files / "locked", "the test"), ThreadPoolExecutor(max_workers=4) as pool:
        runs = pool.map(lambda probe: _run_probe(probe, bad_files, scratch), PROBES)
        return dict(zip([p[0] for p in PROBES], runs))


STRATEGY_PAIR_PROBES = ("tinybert-head-mismatch", "minilm-relation-heads", "tinybert-layer-map")


@pytest.mark.parametrize("probe", PROBES, ids=[p[0] for p in PROBES])
def test_bad_input_exits_2_naming_it_before_ray_or_corpus(probe, probe_runs):
    name, script, _, named = probe
    result = probe_runs[name]
    run, tmp = result["run"], result["tmp"]
    where = f"{name} ({result['seconds']:.1f} s): {run.stderr[-2000:]}"
    assert run.returncode == 2, where
    lines = run.stderr.strip().splitlines()
    assert "Traceback" not in run.stderr, where
    assert len(lines) == 1 or (script != "report" and lines[0].startswith("usage:")), where  # argparse adds usage
    assert lines[-1].startswith(f"{PREFIX[script]}: error: "), where
    for part in (named,) if isinstance(named, str) else named:
        assert part in lines[-1], where
    # A strategy's own pair checks live in its module (raykd/strategies/), which imports torch.
    allowed = {"torch", "transformers"} if name in STRATEGY_PAIR_PROBES else set()
    assert set(result["imported"]) <= allowed, f"{name} imported {result['imported']} before refusing the input"
    assert not any((tmp / "ray").glob("session_*")), f"{name} started a Ray session"
    assert not any((tmp / "cache").glob("data-*")), f"{name} built a corpus"
    assert not (tmp / "out").exists(), f"{name} created its output folder"
