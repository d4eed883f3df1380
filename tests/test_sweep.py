"""The sweep as users run it: results contract, resume after a killed driver, tuned LRs, bad input."""
import json
import subprocess

import numpy as np
import pandas as pd
import pytest
from transformers import AutoModelForMaskedLM

from conftest import sweep_command
from raykd.config import CONTROLS, load_config
from raykd.data.meta import load_meta
from raykd.evaluation import TASKS
from raykd.flops import step_flops
from raykd.strategies import build_strategy
from raykd.plan import masked_per_sequence

SPEC_COLUMNS = ["strategy", "budget", "budget_unit", "repetition", "seed", "flops", "tokens", "device_seconds",
                "unique_tokens", "epochs", "steps", "lr", "mlm_val_loss", "glue_score", "checkpoint"]


@pytest.fixture(scope="module")
def everything(smoke_study):
    return pd.read_parquet(smoke_study["out"] / "results.parquet")


@pytest.fixture(scope="module")
def results(everything):
    """The pretraining trials (no control rows)."""
    return everything[~everything.strategy.isin(CONTROLS)]


def test_results_meet_the_contract(results, smoke_study):
    config = load_config("smoke")
    assert sorted(results["strategy"]) == sorted(config.strategies)
    for column in SPEC_COLUMNS + config.eval.tasks:
        assert column in results.columns, column
    meta = load_meta(next(smoke_study["cache"].glob("data-*/meta.json")))
    batch, seq = config.train.per_worker_batch * config.train.workers, meta["seq_len"]
    masked = batch * masked_per_sequence(seq, config.data.mask_prob, meta["special_ids"], meta["vocab_size"])
    shape, teacher = config.student, config.teacher.shape
    for row in results.itertuples():
        strategy = build_strategy(row.strategy, shape, teacher, config.strategy_options)
        charge = step_flops(strategy, shape, teacher, meta["vocab_size"], batch, seq, masked).total
        assert row.flops <= row.budget and row.budget - row.flops < charge, row.trial_id
        assert row.flops == pytest.approx(row.steps * charge)
        assert row.tokens == row.steps * batch * seq
        assert row.epochs == pytest.approx(row.tokens / row.unique_tokens)
        assert row.device_seconds > 0 and np.isfinite(row.mlm_val_loss)
        AutoModelForMaskedLM.from_pretrained(row.checkpoint)  # an HF student, loadable as such
    scratch = results[results.strategy == "scratch"].iloc[0]
    # The pool is T_scratch / r, the same for every strategy; KD, paying for the teacher, sees fewer tokens.
    assert set(results.unique_tokens) == {int(scratch.tokens / scratch.repetition) // seq * seq}
    assert (results[results.strategy != "scratch"].tokens < scratch.tokens).all()


def test_every_study_has_its_controls_and_references(everything, smoke_study):
    """random_init (the seed's initial weights) and the teacher, fine-tuned like the students; study.json
    holds the unigram entropy, the teacher's MLM loss and each task's chance level."""
    config = load_config("smoke")
    controls = everything[everything.strategy.isin(CONTROLS)].set_index("strategy")
    assert sorted(controls.index) == sorted(CONTROLS) and set(controls.seed) == set(config.seeds)
    meta = load_meta(next(smoke_study["cache"].glob("data-*/meta.json")))
    random_init, teacher = controls.loc["random_init"], controls.loc["teacher"]
    assert (random_init.budget, random_init.flops, random_init.steps, random_init.tokens) == (0, 0, 0, 0)
    # An untrained LM head predicts about uniformly: its loss is near ln(V); the teacher's is far below.
    assert abs(random_init.mlm_val_loss - np.log(meta["vocab_size"])) < 0.5
    teacher_record = json.loads(next(smoke_study["cache"].glob("teacher-*/teacher.json")).read_text())
    assert teacher.budget == config.teacher.budget and teacher.flops == pytest.approx(teacher_record["flops"])
    assert teacher.steps == teacher_record["steps"] and teacher.mlm_val_loss < random_init.mlm_val_loss - 1
    AutoModelForMaskedLM.from_pretrained(teacher.checkpoint)
    for task in config.eval.tasks + ["glue_score"]:
        assert np.isfinite(controls[task]).all(), task
    study = json.loads((smoke_study["out"] / "study.json").read_text())
    assert study["references"]["teacher_mlm_val_loss"] == pytest.approx(teacher.mlm_val_loss)
    assert 0 < study["references"]["unigram_entropy"] < np.log(meta["vocab_size"])
    assert set(study["chance"]) == set(config.eval.tasks)
    assert study["chance"]["syn_cola"] == 0 and study["chance"]["syn_sts"] == 0
    assert 100 / 8 <= study["chance"]["syn_topic"] < 30 and 50 <= study["chance"]["syn_para"] < 70


def test_glue_columns_hold_real_metric_values(everything):
    tasks = load_config("smoke").eval.tasks
    results = everything
    for task in tasks:
        values = results[task]
        assert values.notna().all() and values.between(-100, 100).all(), task
        if TASKS[task].metric in ("accuracy", "f1_accuracy"):
            assert (values >= 0).all(), task
    assert results["glue_score"].to_numpy() == pytest.approx(results[tasks].mean(axis=1).to_numpy())
    assert results[tasks].to_numpy().std() > 0  # not a constant stand-in


def test_resume_completes_the_study_and_keeps_finished_trials(smoke_study, everything):
    results = everything
    at_kill = smoke_study["at_kill"]
    assert 1 <= len(at_kill) < len(results), "the driver was not killed mid-sweep"
    rows = smoke_study["out"] / "trials"
    for name, (content, mtime) in at_kill.items():
        path = rows / name
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime, f"{name} was recomputed"
    assert len(list(rows.glob("*.json"))) == len(results) == len(load_config("smoke").strategies) + len(CONTROLS)
    curves = pd.read_parquet(smoke_study["out"] / "curves.parquet")
    # Every pretraining trial has its curve; the controls were never pretrained.
    assert set(curves.trial_id) == set(results[~results.strategy.isin(CONTROLS)].trial_id)


# Columns that measure time or name a place; everything else is a number the seed fixes.
TIME_AND_PATH_COLUMNS = ["device_seconds", "wall_seconds", "checkpoint", "lr_source"]


@pytest.fixture(scope="module")
def uninterrupted_study(smoke_study, tmp_path_factory):
    """The same smoke study (same tuned LRs, same cache), run once without interruption."""
    import shutil

    out = tmp_path_factory.mktemp("uninterrupted")
    shutil.copy(smoke_study["out"] / "tuned_lr.json", out / "tuned_lr.json")
    run = subprocess.run(sweep_command("grid.py", "--preset", "smoke", "--out", str(out),
                                       "--cache-dir", str(smoke_study["cache"])),
                         env=smoke_study["env"], capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def test_a_killed_and_resumed_study_equals_an_uninterrupted_one(smoke_study, uninterrupted_study):
    resumed = pd.read_parquet(smoke_study["out"] / "results.parquet").sort_values("trial_id", ignore_index=True)
    clean = pd.read_parquet(uninterrupted_study / "results.parquet").sort_values("trial_id", ignore_index=True)
    rows = len(load_config("smoke").strategies) + len(CONTROLS)
    assert list(resumed.columns) == list(clean.columns) and len(resumed) == len(clean) == rows
    assert resumed.lr_source.str.startswith("tuned:").sum() == clean.lr_source.str.startswith("tuned:").sum() > 0
    compared = [column for column in clean.columns if column not in TIME_AND_PATH_COLUMNS]
    pd.testing.assert_frame_equal(resumed[compared], clean[compared], check_exact=True)


def test_the_teacher_was_pretrained_once(smoke_study):
    teachers = list(smoke_study["cache"].glob("teacher-*/teacher.json"))
    assert len(teachers) == 1
    runs = list((smoke_study["out"] / "ray").glob("teacher-*"))
    assert len(runs) <= 1  # pretrained by the tuning run or the grid, never twice


def test_grid_uses_the_tuned_learning_rates(smoke_study, results):
    tuned = json.loads((smoke_study["out"] / "tuned_lr.json").read_text())["lr"]
    assert set(tuned) == {"scratch", "tinybert"}
    config = load_config("smoke")
    for row in results.itertuples():
        if row.strategy in tuned:
            assert row.lr == pytest.approx(tuned[row.strategy][f"{row.budget:g}"])
            assert row.lr_source.startswith("tuned:") and row.lr_source.endswith("tuned_lr.json")
            assert config.tune.lr_min <= row.lr <= config.tune.lr_max
        else:
            assert (row.lr, row.lr_source) == (config.train.lr, "config:train.lr")


def test_the_report_matches_pandas_on_the_smoke_study(smoke_study):
    from test_analysis import assert_report_matches

    assert_report_matches(smoke_study["out"])


def test_a_corrupt_shard_is_named_before_any_trial(smoke_study, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    data = next(smoke_study["cache"].glob("data-*"))
    shutil.copytree(data, cache / data.name)
    shard = sorted((cache / data.name / "train").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    run = subprocess.run(sweep_command("grid.py", "--preset", "smoke", "--out", str(tmp_path / "out"),
                                       "--cache-dir", str(cache)), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and shard.name in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "out" / "trials").exists()
