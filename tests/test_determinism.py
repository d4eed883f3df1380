"""Same seed, same numbers: every random draw of a trial comes from (seed, rank, purpose).

Dropout masks are reseeded per step from (seed, "dropout", rank, step) and the
strategies' projection heads from (seed, "strategy"); the student's
initialisation was already seeded. So two runs of one cell give bit-identical
weights and losses whatever state the process's RNG was in, with 1 worker in
process and 2 workers on Ray Train, and a trial killed mid-run and restored
from its checkpoint ends where the uninterrupted one does.
"""
import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM

from raykd.budget import BudgetMeter
from raykd.data.stream import validation_batches
from raykd.ray_train import TrialSpec, build_trial, run_pretraining
from raykd.teacher import ColocatedTeacher, LocalTeacher
from raykd.train import StudentStep, derived_seed, make_optimizer, pretrain
from test_ray_train import corpus, run_and_kill, spec_for  # noqa: F401  (corpus is a fixture)

STRATEGIES = ["scratch", "vanilla_kd", "tinybert", "minilm"]
IN_PROCESS_STEPS = 6


def train_in_process(spec: TrialSpec, process_seed: int, seeded: bool = True) -> tuple[list[float], dict]:
    """One worker's loop, in this process, after putting the process RNG in state `process_seed`."""
    torch.manual_seed(process_seed)  # as if another process, with its own history, ran the trial
    config, cell, train = spec.config, spec.cell, spec.config.train
    student, strategy = build_trial(spec)
    step_module = StudentStep(student, strategy)
    optimizer = make_optimizer(step_module, cell.lr, tuple(train.betas), train.eps, train.weight_decay)
    meter = BudgetMeter(cell.budget, config.budget_unit, devices=1)
    needs = strategy.teacher_needs()
    teacher = None
    if needs is not None:
        teacher = ColocatedTeacher(LocalTeacher(AutoModelForMaskedLM.from_pretrained(spec.teacher_dir), needs))
    batches = itertools.cycle(list(validation_batches(spec.corpus.meta_path, train.per_worker_batch, cell.seed,
                                                      max_examples=4 * train.per_worker_batch)))
    losses = [report.loss for report in pretrain(
        step_module, strategy, batches, meter, optimizer, peak_lr=cell.lr, student_shape=config.student,
        teacher_shape=config.teacher.shape, vocab_size=spec.corpus.vocab_size, teacher=teacher,
        dropout_seed=derived_seed(cell.seed, "dropout", 0) if seeded else None)]
    assert len(losses) == IN_PROCESS_STEPS
    return losses, {k: v.clone() for k, v in step_module.state_dict().items()}


def one_worker_spec(corpus, strategy):  # noqa: F811
    return spec_for(corpus, strategy, steps=IN_PROCESS_STEPS, workers=1, teacher_placement="colocated")


def assert_identical(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_worker_twice_gives_bit_identical_weights_and_losses(corpus, strategy):  # noqa: F811
    spec = one_worker_spec(corpus, strategy)
    (losses_a, weights_a), (losses_b, weights_b) = (train_in_process(spec, seed) for seed in (1, 2))
    assert losses_a == losses_b
    assert_identical(weights_a, weights_b)


def test_the_comparison_sees_unseeded_dropout(corpus):  # noqa: F811
    """The check above can fail: with dropout drawn from the process RNG, the two runs part."""
    spec = one_worker_spec(corpus, "scratch")
    (losses_a, _), (losses_b, _) = (train_in_process(spec, seed, seeded=False) for seed in (1, 2))
    assert losses_a != losses_b


def final_weights(summary: dict) -> dict:
    return load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))


def step_losses(summary: dict) -> list[tuple]:
    """(step, loss, strategy parts) of every step, from the trial's curve (no timings)."""
    return [(row["step"], row["loss"], row.get("kd_loss"), row.get("mlm_loss"))
            for row in summary["curve"] if not row.get("final")]


@pytest.fixture(scope="module")
def two_worker_runs(ray_local, corpus, tmp_path_factory):  # noqa: F811
    """Every strategy twice on Ray Train with 2 DDP workers (4 steps each), run one after the other."""
    storage = str(tmp_path_factory.mktemp("storage"))
    specs = {strategy: spec_for(corpus, strategy, steps=4, checkpoint_every=100, audit_examples=False)
             for strategy in STRATEGIES}
    return {(strategy, attempt): run_pretraining(specs[strategy], storage, f"det-{strategy}-{attempt}")
            for strategy in STRATEGIES for attempt in (1, 2)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_workers_twice_give_bit_identical_weights_and_losses(two_worker_runs, strategy):
    first, second = two_worker_runs[(strategy, 1)], two_worker_runs[(strategy, 2)]
    assert first["steps"] == second["steps"] == 4
    assert step_losses(first) == step_losses(second)
    assert first["mlm_val_loss"] == second["mlm_val_loss"]
    assert_identical(final_weights(first), final_weights(second))


def test_a_trial_killed_mid_run_resumes_bit_identical(ray_local, corpus, tmp_path):  # noqa: F811
    # 60 steps, a checkpoint every 5: a tiny model's steps take milliseconds, its reports far
    # longer, so the kill (sent at the first checkpoint) lands while many reports remain.
    spec = spec_for(corpus, "tinybert", steps=60, workers=1, audit_examples=False, teacher_placement="colocated",
                    checkpoint_every=5)
    clean = run_pretraining(spec, str(tmp_path), "clean")
    resumed, killed = run_and_kill(spec, str(tmp_path), "killed", "RayTrainWorker")
    assert killed, "no training worker was found to kill"
    assert clean["restored_from"] == [] and len(resumed["restored_from"]) == 1
    assert 0 < resumed["restored_from"][0] < resumed["steps"] == clean["steps"] == 60, resumed["restored_from"]
    assert step_losses(resumed) == step_losses(clean)
    assert resumed["mlm_val_loss"] == clean["mlm_val_loss"]
    assert_identical(final_weights(resumed), final_weights(clean))
