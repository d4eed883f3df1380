"""The Tune trainables: what one trial of a study does, in its own Tune trial process.

- `pretrain_and_evaluate` (the grid): pretrain one cell on Ray Train (a control:
  no pretraining), fine-tune the student on every task, report its row;
- `pretrain_for_tuning` (the LR search): pretrain one cell at the sampled LR and
  report its validation loss to ASHA.

Tune's `param_space` holds the cell as plain values (the live table shows them)
and a `StudyRun`: the validated configuration and the stages every trial
shares, typed. A trial looks its `Cell` up by id and hands the configuration
and the cell, as they are, to `raykd.ray_train` as a `TrialSpec`.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ray import tune

from raykd import storage as store
from raykd.config import CONTROLS, StudyConfig
from raykd.plan import Cell
from raykd.ray_train import Corpus, TrialSpec
from raykd.strategies import build_strategy


@dataclass(frozen=True)
class StudyRun:
    """What every trial of one Tune experiment shares: the study's configuration, its planned cells
    (by trial id) and where its stages are in the storage."""

    config: StudyConfig
    cells: dict[str, Cell]
    corpus: Corpus
    storage: str
    key: str  # names the Train runs: a resumed study finds their checkpoints
    teacher_dir: str | None = None
    tokenizer_dir: str | None = None
    tasks_dir: str | None = None
    teacher_ledger: dict = field(default_factory=dict)  # the teacher control's pretraining columns

    def cell(self, trial_config: dict) -> Cell:
        """The cell a trial runs, from the plain values Tune gave it."""
        return self.cells[trial_config["cell"]["trial_id"]]

    def spec(self, cell: Cell) -> TrialSpec:
        """The pretraining trial of `cell`."""
        return TrialSpec(self.config, cell, self.corpus, self.teacher_dir)


def pretrain_and_evaluate(trial_config: dict) -> None:
    """A Tune trial: pretrain one cell on Ray Train (controls: none), fine-tune it on every task, report its row."""
    study: StudyRun = trial_config["study"]
    cell = study.cell(trial_config)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="raykd-control-") as scratch_dir:
        if cell.strategy in CONTROLS:
            summary = control_summary(cell, study, Path(scratch_dir))
        else:
            summary = pretrain(cell, study)
        scores = evaluate(summary["checkpoint"], study, cell.seed)
    row = {"trial_id": cell.trial_id, "strategy": cell.strategy, "budget": cell.budget,
           "repetition": cell.repetition, "seed": cell.seed,
           "budget_unit": summary.get("budget_unit", study.config.budget_unit),
           **{k: summary[k] for k in ("flops", "teacher_flops", "tokens", "device_seconds", "unique_tokens",
                                      "epochs", "steps", "mlm_val_loss", "kd_loss")},
           "lr": cell.lr, "lr_source": cell.lr_source, **scores["scores"], "glue_score": scores["glue_score"],
           "checkpoint": summary["checkpoint"] if cell.strategy != "random_init" else "",
           "wall_seconds": time.time() - started, "curve": json.dumps(summary.get("curve", []))}
    last = (summary.get("curve") or [{}])[-1]  # keeps the pretraining columns of the live table filled
    tune.report({"step": row["steps"], "budget_fraction": last.get("budget_fraction", math.nan),
                 "loss": last.get("loss", math.nan), "mlm_val_loss": row["mlm_val_loss"],
                 "glue_score": row["glue_score"], "row_json": json.dumps(row, default=float)})


def pretrain(cell: Cell, study: StudyRun) -> dict:
    """Pretrain one grid cell on Ray Train; Train's reports are forwarded to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from raykd.ray_train import run_pretraining

    return run_pretraining(study.spec(cell), study.storage, name=f"{study.key}-{cell.trial_id}",
                           callbacks=[TuneReportCallback()])


def control_summary(cell: Cell, study: StudyRun, folder: Path) -> dict:
    """A control's pretraining row: `random_init` is the student at its seed's initial weights (saved to
    `folder`), `teacher` the teacher itself with its own pretraining ledger; both get an MLM validation loss."""
    import torch
    from transformers import AutoModelForMaskedLM

    from raykd.data.stream import validation_batches
    from raykd.models import build_masked_lm
    from raykd.teacher import model_folder
    from raykd.train import StudentStep, validation_losses

    config = study.config
    torch.set_num_threads(config.train.num_threads)
    if cell.strategy == "random_init":
        model = build_masked_lm(config.student, study.corpus.vocab_size, study.corpus.seq_len, seed=cell.seed,
                                dropout=config.train.dropout)
        model.save_pretrained(folder / "student")
        checkpoint, ledger = str(folder / "student"), {}
    else:
        checkpoint, ledger = study.teacher_dir, dict(study.teacher_ledger)
        model = AutoModelForMaskedLM.from_pretrained(model_folder(checkpoint))
    batches = validation_batches(study.corpus.meta_path, config.train.per_worker_batch, cell.seed,
                                 max_examples=config.train.validation_examples, mask_prob=config.data.mask_prob)
    losses = validation_losses(StudentStep(model, build_strategy("scratch", None, None, {})), batches)
    return {"flops": 0.0, "teacher_flops": 0.0, "tokens": 0, "device_seconds": 0.0, "unique_tokens": 0,
            "epochs": 0.0, "steps": 0, **ledger, "mlm_val_loss": losses["mlm_val_loss"], "kd_loss": math.nan,
            "checkpoint": checkpoint}


def evaluate(student_dir: str, study: StudyRun, seed: int) -> dict:
    """Fine-tune a student on every task of the study (the same code for students and controls)."""
    from raykd.evaluation import evaluate_student

    tasks_dir = store.local_copy(study.tasks_dir) if study.tasks_dir else None
    with store.local_folder(student_dir) as folder:
        return evaluate_student(folder, store.local_copy(study.tokenizer_dir), study.config.eval.tasks,
                                data_dir=tasks_dir, seed=seed, **finetuning_options(study.config))


def finetuning_options(config: StudyConfig) -> dict:
    """The study's fine-tuning protocol as `evaluate_student` takes it (all but the tasks, their folder and the seed)."""
    evaluation, train = config.eval, config.train
    return dict(learning_rates=evaluation.learning_rates, batch_sizes=evaluation.batch_sizes, epochs=evaluation.epochs,
                max_seq_len=evaluation.max_seq_len, max_train_examples=evaluation.train_examples,
                max_eval_examples=evaluation.validation_examples, num_threads=train.num_threads,
                precision=train.precision)


def pretrain_for_tuning(trial_config: dict) -> None:
    """A Tune trial of the LR search: pretrain one cell at the sampled LR, on `tune.budget_fraction`
    of its budget; Train's reports drive ASHA."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from raykd.ray_train import run_pretraining

    study: StudyRun = trial_config["study"]
    cell = study.cell(trial_config)
    sampled = replace(cell, budget=cell.budget * study.config.tune.budget_fraction, lr=trial_config["lr"])
    name = f"tune-{study.key}-{tune.get_context().get_trial_id()}"
    summary = run_pretraining(study.spec(sampled), study.storage, name=name, callbacks=[TuneReportCallback()])
    last = summary["curve"][-1]
    tune.report({"val_loss": last["val_loss"], "mlm_val_loss": last["mlm_val_loss"], "budget_fraction": 1.0})


def trial_resources(trial_config: dict) -> tune.PlacementGroupFactory:
    """The trial process's share, plus one bundle per teacher actor it starts (Tune requires the slots).

    The training workers are not in it: Ray Train gives them a placement group of their own.
    """
    study: StudyRun = trial_config["study"]
    cell = study.cell(trial_config)
    bundles = [{"CPU": study.config.sweep.trial_cpus}]
    if cell.strategy not in CONTROLS:
        teacher = study.config.teacher
        actor = {"CPU": teacher.actor_cpus, **({"GPU": teacher.actor_gpus} if teacher.actor_gpus else {})}
        bundles += [actor] * study.spec(cell).actor_count()
    return tune.PlacementGroupFactory(bundles)


def progress_table(**parameters: str) -> tune.CLIReporter:
    """Tune's live table: one row per trial, naming its cell and where its pretraining stands.

    `parameters` adds config columns (flattened key: header), e.g. the sampled LR of a search.
    """
    # Tune's newer output engine infers its columns (it would print each whole cell dict);
    # only the classic reporter takes chosen columns, so select it unless the user chose.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    return tune.CLIReporter(
        parameter_columns={"cell/strategy": "strategy", "cell/budget": "budget", "cell/repetition": "rep",
                           "cell/seed": "seed", **parameters},
        metric_columns={"step": "step", "budget_fraction": "budget used", "loss": "loss",
                        "mlm_val_loss": "MLM val", "glue_score": "GLUE"},
        max_report_frequency=15)
