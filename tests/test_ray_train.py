"""Ray Train trials: 2 DDP workers + a teacher actor, the ledger, faults, and the teacher cache."""
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from raykd.config import StudyConfig, TeacherConfig, TrainConfig, load_config
from raykd.data.meta import load_meta
from raykd.flops import step_flops
from raykd.models import ModelShape, build_masked_lm
from raykd.plan import Cell, masked_per_sequence
from raykd.ray_train import Corpus, TrialSpec, run_pretraining
from raykd.stages import ensure_teacher, prepare_data
from raykd.strategies import build_strategy

STUDENT = ModelShape(2, 32, 2, 64)
TEACHER = ModelShape(2, 64, 2, 128)
BATCH = 8


@pytest.fixture(scope="module")
def corpus(raykd_cache, tmp_path_factory):
    config = load_config("smoke")
    meta_path = prepare_data(config, raykd_cache)
    meta = load_meta(meta_path)
    teacher_dir = tmp_path_factory.mktemp("teacher")
    build_masked_lm(TEACHER, meta["vocab_size"], meta["seq_len"], seed=1).save_pretrained(teacher_dir)
    return meta_path, meta, str(teacher_dir)


def spec_for(corpus, strategy, steps=12, *, teacher_placement="actor", audit_examples=True, **train):
    """A trial of `strategy` paying for `steps` steps; `train` changes the TrainConfig fields."""
    meta_path, meta, teacher_dir = corpus
    train = {"workers": 2, "cpus_per_worker": 0.5, "per_worker_batch": BATCH, "checkpoint_every": 3,
             "eval_points": 2, "validation_examples": 16, **train}
    step = step_charge(strategy, meta, workers=train["workers"]).total
    config = StudyConfig(student=STUDENT, strategy_options={"relation_heads": 2}, train=TrainConfig(**train),
                         teacher=TeacherConfig(shape=TEACHER, placement=teacher_placement, actor_cpus=0.5))
    cell = Cell(strategy, budget=step * (steps + 0.5), repetition=1.0, seed=0, unique_examples=40, lr=1e-3)
    return TrialSpec(config, cell, Corpus.of(str(meta_path), meta), teacher_dir=teacher_dir,
                     audit_examples=audit_examples)


def step_charge(strategy, meta, workers):
    masked = workers * BATCH * masked_per_sequence(meta["seq_len"], 0.15, meta["special_ids"], meta["vocab_size"])
    built = build_strategy(strategy, STUDENT, TEACHER, {"relation_heads": 2})
    return step_flops(built, STUDENT, TEACHER, meta["vocab_size"], workers * BATCH, meta["seq_len"], masked)


def assert_pass_structure(counts, unique, examples_seen):
    """k full passes: every pool example k times; the partial pass: no example twice."""
    full, partial = divmod(examples_seen, unique)
    assert sum(counts.values()) == examples_seen
    assert len(counts) == (unique if full else partial)
    assert sorted(set(counts.values())) <= [full, full + 1]
    assert sum(1 for c in counts.values() if c == full + 1) == partial


@pytest.fixture(scope="module")
def kd_runs(ray_local, corpus, tmp_path_factory):
    storage = str(tmp_path_factory.mktemp("storage"))
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(run_pretraining, spec_for(corpus, name), storage, f"kd-{name}")
                   for name in ("vanilla_kd", "tinybert", "minilm")}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", ["vanilla_kd", "tinybert", "minilm"])
def test_two_workers_and_a_teacher_actor_charge_the_global_step(kd_runs, corpus, name):
    summary = kd_runs[name]
    spec = spec_for(corpus, name)
    charge = step_charge(name, corpus[1], workers=2)
    assert summary["steps"] == 12
    assert summary["flops"] == pytest.approx(12 * charge.total)
    assert summary["teacher_flops"] == pytest.approx(12 * charge.teacher) and charge.teacher > 0
    assert summary["flops"] <= spec.cell.budget and spec.cell.budget - summary["flops"] < charge.total
    assert summary["tokens"] == 12 * 2 * BATCH * corpus[1]["seq_len"]
    assert summary["device_seconds"] > 0
    assert_pass_structure(summary["example_counts"], 40, 12 * 2 * BATCH)
    assert summary["epochs"] == pytest.approx(12 * 2 * BATCH / 40)
    student = Path(summary["checkpoint"])
    assert (student / "config.json").exists()
    assert summary["curve"][-1]["mlm_val_loss"] == pytest.approx(summary["mlm_val_loss"])


def checkpointed_steps(run_dir: Path) -> int:
    """The step of the newest checkpoint Ray Train has registered for a trial (0: none yet).

    Registered, not merely written: a checkpoint whose files are uploaded but whose report
    the controller has not recorded is not restored after a failure (the trial restarts
    from step 0), so a kill must wait for the registration to test recovery."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return 0
    return max((int(result["metrics"]["steps"]) for result in results), default=0)


def run_and_kill(spec, storage, name, class_name):
    """Run a trial; once its first checkpoint is registered, SIGKILL one live actor of `class_name`.

    Returns the summary and the kills as (pid, step of the newest checkpoint when the kill was sent)."""
    killed = []

    def killer():
        run_dir = Path(storage) / name
        deadline = time.time() + 300
        while time.time() < deadline and not checkpointed_steps(run_dir):
            time.sleep(0.1)
        # The GCS's actor table (the state API would need the dashboard, which tests don't start).
        for actor in ray._private.state.actors().values():
            if actor["ActorClassName"] == class_name and actor["State"] == "ALIVE" and actor["Pid"]:
                os.kill(actor["Pid"], signal.SIGKILL)
                killed.append((actor["Pid"], checkpointed_steps(run_dir)))
                return

    thread = threading.Thread(target=killer)
    thread.start()
    summary = run_pretraining(spec, storage, name)
    thread.join()
    return summary, killed


@pytest.mark.parametrize("victim", ["RayTrainWorker", "TeacherActor"])
def test_a_killed_worker_or_teacher_does_not_change_the_trial(kd_runs, corpus, tmp_path, victim):
    spec = spec_for(corpus, "vanilla_kd")
    summary, killed = run_and_kill(spec, str(tmp_path), f"fault-{victim}", victim)
    assert killed, f"no {victim} was found to kill"
    [(_, checkpointed_at_kill)] = killed
    clean = kd_runs["vanilla_kd"]
    # The kill landed mid-trial: before the checkpoint of its last step was written.
    assert 0 < checkpointed_at_kill < clean["steps"] == 12, checkpointed_at_kill
    if victim == "RayTrainWorker":  # Ray Train restarted the group from a checkpoint before the end
        assert len(summary["restored_from"]) == 1 and 0 < summary["restored_from"][0] < 12, summary["restored_from"]
    else:  # the actor was restarted and its call retried; the workers never stopped
        assert summary["restored_from"] == []
    assert clean["restored_from"] == []
    assert (summary["steps"], summary["tokens"]) == (clean["steps"], clean["tokens"])
    assert summary["flops"] == clean["flops"] and summary["teacher_flops"] == clean["teacher_flops"]
    assert summary["example_counts"] == clean["example_counts"]
    # Same numbers as the uninterrupted trial, bit for bit: every step's loss and the final student.
    losses = [[(row["step"], row["loss"]) for row in run["curve"] if not row.get("final")] for run in (summary, clean)]
    assert losses[0] == losses[1]
    assert summary["mlm_val_loss"] == clean["mlm_val_loss"]
    weights = [load_file(str(Path(run["checkpoint"]) / "model.safetensors")) for run in (summary, clean)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[1])


def test_the_teacher_stage_is_cached_and_reused(ray_local, tmp_path):
    config = load_config("smoke", overrides=["teacher.budget=2e10"])
    cache, storage = tmp_path / "cache", tmp_path / "storage"
    meta_path = prepare_data(config, cache)
    first, reused_first = ensure_teacher(config, meta_path, cache, str(storage))
    runs_after_first = sorted(p.name for p in storage.iterdir())
    second, reused_second = ensure_teacher(config, meta_path, cache, str(storage))
    assert (reused_first, reused_second) == (False, True)
    assert first == second and (Path(first) / "model.safetensors").exists()
    assert sorted(p.name for p in storage.iterdir()) == runs_after_first  # no second pretraining run
    record = json.loads((Path(first).parent / "teacher.json").read_text())
    assert record["steps"] > 0 and record["flops"] <= 2e10
    other = load_config("smoke", overrides=["teacher.budget=3e10"])


def test_student_validation_masks_at_the_configured_rate(corpus):
    """A trial's MLM validation loss uses data.mask_prob, as its training batches and the controls do."""
    from dataclasses import replace

    from raykd.data.stream import validation_batches
    from raykd.ray_train import _validation
    from raykd.train import StudentStep, validation_losses

    meta_path, meta, _ = corpus
    spec = spec_for(corpus, "scratch")
    at_30 = replace(spec, config=replace(spec.config, data=replace(spec.config.data, mask_prob=0.3)))
    step = StudentStep(build_masked_lm(STUDENT, meta["vocab_size"], meta["seq_len"], seed=0),
                       build_strategy("scratch", STUDENT, None, {}))
    cpu = torch.device("cpu")
    reported = _validation(step, None, at_30, 0, cpu, "fp32")["mlm_val_loss"]
    expected = validation_losses(step, validation_batches(meta_path, BATCH, 0, max_examples=16, mask_prob=0.3))
    assert reported == pytest.approx(expected["mlm_val_loss"], rel=1e-6)
    assert reported != pytest.approx(_validation(step, None, spec, 0, cpu, "fp32")["mlm_val_loss"], rel=1e-6)
