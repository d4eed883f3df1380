"""The study as one Ray Tune experiment: stages, the strategy × budget × repetition × seed grid, GLUE.

`run_study(config, out, storage, resume)` is what `sweeps/grid.py` calls:
1. everything is validated before compute (config, corpus size vs. pools, output folder);
2. stages: corpus shards, embedded tasks, the teacher (each cached by hash);
3. one Tune trial per grid cell: `pretrain_and_evaluate` launches a
   `TorchTrainer` (Train V2 inside a Tune function) and then fine-tunes the
   student on every task;
4. each finished trial's row is written at once, atomically, to
   `out/trials/<trial_id>.json` and to `<storage>/studies/<key>/trials/`, and
   `out/results.parquet` is rebuilt from them.
Trials read only from the storage (`raykd.storage`): the stages are published
there, the students are checkpointed there, and evaluation downloads them.
`--resume` skips the cells that have a row (in `out` or in the storage: a new
head node with an empty `out` finds them there); an interrupted cell resumes
from its last Train checkpoint in the storage (its Train run name is deterministic).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from ray import tune

from raykd import storage as store
from raykd.config import CONTROLS, ConfigError, StudyConfig
from raykd.data.masking import mask_batch
from raykd.data.meta import load_meta
from raykd.data.shards import unigram_entropy
from raykd.data.stream import unique_examples_for, unique_examples_from_tokens
from raykd.flops import step_flops
from raykd.io import atomic_path, atomic_write_text
from raykd.strategies import build_strategy, needs_teacher
from raykd.stages import (config_hash, default_cache_dir, ensure_teacher, prepare_data, prepare_tasks, publish_data,
                          publish_tasks, teacher_record)
from raykd.study_folder import (STUDY_FILE, TRIALS_DIR, bound_fields, check_binding, finished_rows, hold,
                                record_study, write_row)

RESULTS_FILE = "results.parquet"
CURVES_FILE = "curves.parquet"
TUNED_LR_FILE = "tuned_lr.json"
# A trial whose node is lost (a spot reclaim) starts again on another node and resumes from its
# last checkpoint in the storage; a trial that fails this often has a real error.
TRIAL_RETRIES = 3


def number_key(value: float) -> str:
    """A number as it names itself in trial ids and the tuned-LR file: short (`3e+10`) where that
    reads back as the same float, exact otherwise (3.0000001e10 and 3.0000002e10 never collide)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))



def trial_id(strategy: str, budget: float, repetition: float, seed: int) -> str:
    """The grid cell's name; distinct cells (distinct axis values) get distinct ids."""
    return f"{strategy}-b{number_key(budget)}-r{number_key(repetition)}-s{seed}"


def masked_per_sequence(seq_len: int, mask_prob: float, special_ids: dict, vocab_size: int) -> int:
    """Masked positions in one packed sequence (the masking draws an exact count)."""
    ids = np.full((1, seq_len), special_ids["mask"] + 1, dtype=np.int64)
    ids[0, 0], ids[0, -1] = special_ids["cls"], special_ids["sep"]
    _, labels = mask_batch(ids, np.zeros(1, dtype=np.int64), 0, 0, special_ids=special_ids,
                           vocab_size=vocab_size, mask_prob=mask_prob)
    return int((labels != -100).sum())


def scratch_tokens(config: StudyConfig, budget: float, meta: dict, tokens_per_device_second: float | None = None) -> int:
    """T_scratch: tokens `scratch` processes at this budget (SPEC §4), from the same charge the trial uses.

    A device_seconds budget converts through `tokens_per_device_second` (see `calibration`).
    """
    train, seq_len = config.train, meta["seq_len"]
    global_batch = train.per_worker_batch * train.workers
    tokens_per_step = global_batch * seq_len
    if config.budget_unit == "tokens":
        steps = int(budget // tokens_per_step)
    elif config.budget_unit == "flops":
        shape = config.student
        masked = global_batch * masked_per_sequence(seq_len, config.data.mask_prob, meta["special_ids"], meta["vocab_size"])
        charge = step_flops(build_strategy("scratch", shape, None, config.strategy_options), shape, None,
                            meta["vocab_size"], global_batch, seq_len, masked).total
        steps = int(budget // charge)
    else:
        if not tokens_per_device_second:
            raise ConfigError("train.tokens_per_device_second", "a device_seconds budget needs a measured or given "
                                                                "rate to size its pool (see raykd.calibration)")
        steps = int(budget * tokens_per_device_second // tokens_per_step)
    return steps * tokens_per_step


def plan_cells(config: StudyConfig, meta: dict, tokens_per_device_second: float | None = None) -> list[dict]:
    """The grid: one cell per (budget, repetition, seed, strategy), with its pool size."""
    cells = []
    available = meta["splits"]["train"]["num_examples"]
    for budget in config.budgets:
        tokens = scratch_tokens(config, budget, meta, tokens_per_device_second)
        if tokens == 0 and config.unique_tokens is None:
            raise ConfigError("budgets", f"budget {budget:g} {config.budget_unit} does not pay for one scratch step")
        for repetition in config.repetitions:
            if config.unique_tokens is not None:
                unique = unique_examples_from_tokens(config.unique_tokens, meta["seq_len"])
            else:
                unique = unique_examples_for(tokens, repetition, meta["seq_len"])
            if unique > available:
                raise ConfigError("data.num_documents", f"budget {budget:g} at repetition {repetition:g} needs a pool of "
                                                        f"{unique} sequences; the corpus has {available}")
            for seed in config.seeds:
                for strategy in config.strategies:
                    cells.append({"trial_id": trial_id(strategy, budget, repetition, seed), "strategy": strategy,
                                  "budget": budget, "repetition": repetition, "seed": seed,
                                  "unique_examples": unique, "scratch_tokens": tokens})
    return cells


def control_cells(config: StudyConfig) -> list[dict]:
    """The reference rows of the study, one per control and seed: fine-tuned, never pretrained by the grid."""
    teacher = config.teacher
    budgets = {"random_init": 0.0, "teacher": teacher.budget if teacher.source == "pretrain" else math.nan}
    lrs = {"random_init": math.nan, "teacher": teacher.lr if teacher.source == "pretrain" else math.nan}
    return [{"trial_id": f"{control}-s{seed}", "strategy": control, "budget": budgets[control],
             "repetition": math.nan, "seed": seed, "lr": lrs[control], "lr_source": "control"}
            for seed in config.seeds for control in config.controls]


def learning_rates(config: StudyConfig, out: Path) -> tuple[dict, str | None]:
    """Tuned peak LRs {strategy: {number_key(budget): lr}} and the file they came from (None: config's)."""
    path = Path(config.train.lr_file) if config.train.lr_file else out / TUNED_LR_FILE
    if not path.is_file():
        return {}, None
    try:
        tuned = json.loads(path.read_text())["lr"]
    except (ValueError, KeyError) as error:
        raise ConfigError("train.lr_file", f"{path} is not a tuned-LR file: {error}") from None
    return tuned, str(path)


def lr_for(cell: dict, tuned: dict, source: str | None, default: float) -> tuple[float, str]:
    lr = tuned.get(cell["strategy"], {}).get(number_key(cell["budget"]))
    if lr is None:
        return default, "config:train.lr"
    return float(lr), f"tuned:{source}"


def trial_spec_fields(config: StudyConfig, meta_path: str, meta: dict, teacher_dir: str | None) -> dict:
    """The TrialSpec fields shared by every cell of the study (`meta_path`: the corpus in the storage)."""
    train, teacher = config.train, config.teacher
    return dict(
        budget_unit=config.budget_unit, meta_path=str(meta_path), student=asdict(config.student),
        vocab_size=meta["vocab_size"], seq_len=meta["seq_len"], teacher_dir=teacher_dir,
        teacher_shape=asdict(teacher.shape), teacher_placement=teacher.placement, teacher_actors=teacher.actors,
        teacher_actor_cpus=teacher.actor_cpus, teacher_actor_gpus=teacher.actor_gpus, teacher_dtype=teacher.dtype,
        strategy_options=dict(config.strategy_options), workers=train.workers,
        cpus_per_worker=train.cpus_per_worker, gpus_per_worker=train.gpus_per_worker, num_threads=train.num_threads,
        per_worker_batch=train.per_worker_batch, mask_prob=config.data.mask_prob, betas=tuple(train.betas),
        eps=train.eps, weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm, dropout=train.dropout,
        precision=train.precision, compile=train.compile,
        checkpoint_every=train.checkpoint_every, eval_points=train.eval_points,
        validation_examples=train.validation_examples)


def calibration(config: StudyConfig, meta_path: Path, meta: dict, storage_path: str, key: str,
                out: Path | None = None) -> dict | None:
    """Tokens per device-second for a device_seconds study's pools (None for other units or a given pool).

    `train.tokens_per_device_second` overrides; else the rate this study (same key) already
    recorded in out/study.json, so a resumed study keeps its pools; else a calibration run.
    """
    if config.budget_unit != "device_seconds" or config.unique_tokens is not None:
        return None
    if config.train.tokens_per_device_second:
        return {"tokens_per_device_second": config.train.tokens_per_device_second,
                "source": "config:train.tokens_per_device_second"}
    recorded = out / STUDY_FILE if out else None
    if recorded and recorded.is_file():
        study = json.loads(recorded.read_text())
        if study.get("key") == key and study.get("calibration"):
            return study["calibration"]
    from raykd.calibration import measure_tokens_per_device_second

    start_ray(config)
    return measure_tokens_per_device_second(
        trial_spec_fields(config, meta_path, meta, None), config.train.calibration_steps,
        meta["splits"]["train"]["num_examples"], config.seeds[0], config.train.lr, storage_path,
        name=f"calibrate-{key}-{int(time.time())}")


def _rate(measured: dict | None) -> float | None:
    return measured["tokens_per_device_second"] if measured else None


def pretrain_and_evaluate(trial_config: dict) -> None:
    """A Tune trial: pretrain one cell on Ray Train (controls: none), fine-tune it on every task, report its row."""
    cell, study = trial_config["cell"], trial_config["study"]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="raykd-control-") as scratch_dir:
        if cell["strategy"] in CONTROLS:
            summary = control_summary(cell, study, Path(scratch_dir))
        else:
            summary = pretrain(cell, study)
        scores = evaluate(summary["checkpoint"], study, cell["seed"])
    row = {**{k: cell[k] for k in ("trial_id", "strategy", "budget", "repetition", "seed")},
           "budget_unit": summary.get("budget_unit", study["spec"]["budget_unit"]),
           **{k: summary[k] for k in ("flops", "teacher_flops", "tokens", "device_seconds", "unique_tokens",
                                      "epochs", "steps", "mlm_val_loss", "kd_loss")},
           "lr": cell["lr"], "lr_source": cell["lr_source"], **scores["scores"], "glue_score": scores["glue_score"],
           "checkpoint": summary["checkpoint"] if cell["strategy"] != "random_init" else "",
           "wall_seconds": time.time() - started, "curve": json.dumps(summary.get("curve", []))}
    last = (summary.get("curve") or [{}])[-1]  # keeps the pretraining columns of the live table filled
    tune.report({"step": row["steps"], "budget_fraction": last.get("budget_fraction", math.nan),
                 "loss": last.get("loss", math.nan), "mlm_val_loss": row["mlm_val_loss"],
                 "glue_score": row["glue_score"], "row_json": json.dumps(row, default=float)})


def uses_teacher(strategy: str) -> bool:
    """Whether a grid cell needs the teacher: a strategy that distils, or the `teacher` control."""
    if strategy in CONTROLS:
        return strategy == "teacher"
    return needs_teacher(strategy)


def pretrain(cell: dict, study: dict) -> dict:
    """Pretrain one grid cell on Ray Train; Train's reports are forwarded to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from raykd.ray_train import TrialSpec, run_pretraining

    spec = TrialSpec(strategy=cell["strategy"], budget=cell["budget"], unique_examples=cell["unique_examples"],
                     seed=cell["seed"], peak_lr=cell["lr"], **study["spec"])
    return run_pretraining(spec, study["storage"], name=f"{study['key']}-{cell['trial_id']}",
                           callbacks=[TuneReportCallback()])


def control_summary(cell: dict, study: dict, folder: Path) -> dict:
    """A control's pretraining row: `random_init` is the student at its seed's initial weights (saved to
    `folder`), `teacher` the teacher itself with its own pretraining ledger; both get an MLM validation loss."""
    import torch
    from transformers import AutoModelForMaskedLM

    from raykd.data.stream import validation_batches
    from raykd.models import ModelShape, build_masked_lm
    from raykd.teacher import model_folder
    from raykd.train import StudentStep, validation_losses

    spec = study["spec"]
    torch.set_num_threads(spec["num_threads"])
    if cell["strategy"] == "random_init":
        model = build_masked_lm(ModelShape(**spec["student"]), spec["vocab_size"], spec["seq_len"], seed=cell["seed"],
                                dropout=spec["dropout"])
        model.save_pretrained(folder / "student")
        checkpoint, ledger = str(folder / "student"), {}
    else:
        checkpoint, ledger = spec["teacher_dir"], dict(study["teacher_ledger"])
        model = AutoModelForMaskedLM.from_pretrained(model_folder(checkpoint))
    batches = validation_batches(spec["meta_path"], spec["per_worker_batch"], cell["seed"],
                                 max_examples=spec["validation_examples"], mask_prob=spec["mask_prob"])
    losses = validation_losses(StudentStep(model, build_strategy("scratch", None, None, {})), batches)
    return {"flops": 0.0, "teacher_flops": 0.0, "tokens": 0, "device_seconds": 0.0, "unique_tokens": 0,
            "epochs": 0.0, "steps": 0, **ledger, "mlm_val_loss": losses["mlm_val_loss"], "kd_loss": math.nan,
            "checkpoint": checkpoint}


def evaluate(student_dir: str, study: dict, seed: int) -> dict:
    """Fine-tune a student on every task of the study (the same code for students and controls)."""
    from raykd.evaluation import evaluate_student

    evaluation = study["eval"]
    tasks_dir = store.local_copy(study["tasks_dir"]) if study["tasks_dir"] else None
    with store.local_folder(student_dir) as folder:
        return evaluate_student(folder, store.local_copy(study["tokenizer_dir"]), evaluation["tasks"],
                                data_dir=tasks_dir, learning_rates=evaluation["learning_rates"],
                                batch_sizes=evaluation["batch_sizes"], epochs=evaluation["epochs"],
                                max_seq_len=evaluation["max_seq_len"], seed=seed,
                                max_train_examples=evaluation["train_examples"],
                                max_eval_examples=evaluation["validation_examples"],
                                num_threads=study["spec"]["num_threads"], precision=study["spec"]["precision"])


def trial_resources(trial_config: dict) -> tune.PlacementGroupFactory:
    """The trial process's share, plus one bundle per teacher actor it starts (Tune requires the slots).

    The training workers are not in it: Ray Train gives them a placement group of their own.
    """
    cell, spec = trial_config["cell"], trial_config["study"]["spec"]
    bundles = [{"CPU": trial_config["study"]["trial_cpus"]}]
    if uses_teacher(cell["strategy"]) and cell["strategy"] not in CONTROLS and spec["teacher_placement"] == "actor":
        actor = {"CPU": spec["teacher_actor_cpus"], **({"GPU": spec["teacher_actor_gpus"]} if spec["teacher_actor_gpus"] else {})}
        bundles += [actor] * spec["teacher_actors"]
    return tune.PlacementGroupFactory(bundles)


class RowWriter(tune.Callback):
    """In the driver: each trial's final row goes to `out` and to the storage the moment the trial completes."""

    def __init__(self, out: Path, rows_uri: str):
        self.out = out
        self.rows_uri = rows_uri

    def on_trial_complete(self, iteration, trials, trial, **info):
        if "row_json" in (trial.last_result or {}):
            row = json.loads(trial.last_result["row_json"])
            write_row(self.out, row)
            store.write_text(store.join(self.rows_uri, f"{row['trial_id']}.json"), json.dumps(row, default=float))
            collect_results(self.out)


def collect_results(out: Path) -> pd.DataFrame:
    """Rebuild results.parquet and curves.parquet from the finished trials' rows (atomic writes)."""
    rows = finished_rows(out)
    if not rows:
        return pd.DataFrame()
    curves = []
    for row in rows:
        for point in json.loads(row.pop("curve", "[]")):
            curves.append({"trial_id": row["trial_id"], **point})
    results = pd.DataFrame(rows)
    _write_parquet(results, out / RESULTS_FILE)
    if curves:
        _write_parquet(pd.DataFrame(curves), out / CURVES_FILE)
    return results


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as staging:
        frame.to_parquet(staging, index=False)


# What every Ray worker gets unless --verbose: no per-batch Ray Data progress bars or INFO lines
# ("Estimated parquet encoding ratio"), no transformers "Loading weights" bars.
QUIET_WORKERS = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_LOG_LEVEL": "WARNING",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def sync_rows(out: Path, rows_uri: str, resume: bool) -> None:
    """Make `out` and the storage hold the same finished rows: a head node that lost its disk (an empty
    `out`) gets them back from the storage; a row a killed driver wrote only to `out` reaches the storage."""
    local = {row["trial_id"] for row in finished_rows(out)}
    shared = {uri.rsplit("/", 1)[1].removesuffix(".json"): uri for uri in store.list_files(rows_uri, ".json")}
    if shared and not resume:
        raise ConfigError("out", f"the storage already holds finished trials of this study ({rows_uri}); pass "
                                 f"--resume to complete it")
    for trial in sorted(set(shared) - local):
        write_row(out, json.loads(store.read_text(shared[trial])))
    for row in finished_rows(out):
        if row["trial_id"] not in shared:
            store.write_text(store.join(rows_uri, f"{row['trial_id']}.json"), json.dumps(row, default=float))



def start_ray(config: StudyConfig, verbose: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray with the preset's logical CPUs."""
    if ray.is_initialized():
        return
    env_vars = {} if verbose else QUIET_WORKERS
    if "RAY_ADDRESS" in os.environ:
        ray.init(runtime_env={"env_vars": env_vars})
    else:
        ray.init(num_cpus=config.sweep.ray_cpus, include_dashboard=False,
                 runtime_env={"worker_process_setup_hook": "raykd.logs.quiet_placement_group_cleaner",
                              "env_vars": env_vars})


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


def storage_root(storage: str | None, default: Path) -> str:
    """The storage every node shares, as they all name it (`--storage`, else the local `default`)."""
    try:
        return store.root(storage or default)
    except ValueError as error:
        raise ConfigError("storage", str(error)) from None


def run_study(config: StudyConfig, out: str | Path, storage: str | None = None, resume: bool = False,
              cache_dir: str | Path | None = None, verbose: bool = False) -> pd.DataFrame:
    """Run (or resume) the whole study; returns the results DataFrame (also at out/results.parquet).

    The folder is held by this driver throughout and bound to `config` (study.json).
    verbose: keep Ray Data's and transformers' progress bars and logs in the workers' output.
    """
    out = Path(out).resolve()
    check_binding(out, config, resume)
    with hold(out, "grid.py"):
        check_binding(out, config, resume)  # again, now that no other driver can write it
        return _run_study(config, out, storage, resume, cache_dir, verbose)


def _run_study(config: StudyConfig, out: Path, storage: str | None, resume: bool,
               cache_dir: str | Path | None, verbose: bool) -> pd.DataFrame:
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    storage_path = storage_root(storage, out / "ray")
    meta_path = prepare_data(config, cache, storage_path)
    meta = load_meta(meta_path)
    key = config_hash(bound_fields(config), str(out))  # names the Train runs: a resume finds their checkpoints
    measured = calibration(config, meta_path, meta, storage_path, key, out)
    # Controls first: a study cut short still has its references. Pool sizes are checked before the grid.
    cells = control_cells(config) + plan_cells(config, meta, _rate(measured))
    tuned, tuned_source = learning_rates(config, out)
    tasks_dir = prepare_tasks(config, cache)
    start_ray(config, verbose)
    facts = {"calibration": measured, "chance": chance_levels(config, tasks_dir),
             "references": {"unigram_entropy": unigram_entropy(meta_path)}}
    record_study(out, config, key, **facts)
    rows_uri = store.join(storage_path, store.STUDIES, key, TRIALS_DIR)
    sync_rows(out, rows_uri, resume)
    done = {row["trial_id"] for row in finished_rows(out)}
    todo = [cell for cell in cells if cell["trial_id"] not in done]
    if todo:
        teacher_dir = (ensure_teacher(config, meta_path, cache, storage_path)[0]
                       if any(uses_teacher(cell["strategy"]) for cell in todo) else None)
        for cell in todo:
            if cell["strategy"] not in CONTROLS:
                cell["lr"], cell["lr_source"] = lr_for(cell, tuned, tuned_source, config.train.lr)
        meta_uri = publish_data(meta_path, storage_path)
        study = {"spec": trial_spec_fields(config, meta_uri, meta, teacher_dir), "storage": storage_path,
                 "key": key, "trial_cpus": config.sweep.trial_cpus,
                 "tokenizer_dir": store.join(meta_uri.rsplit("/", 1)[0], meta["tokenizer"]),
                 "tasks_dir": publish_tasks(tasks_dir, storage_path), "eval": asdict(config.eval),
                 "teacher_ledger": teacher_ledger(config, teacher_dir)}
        trainable = tune.with_resources(pretrain_and_evaluate, trial_resources)
        tuner = tune.Tuner(
            trainable,
            param_space={"cell": tune.grid_search(todo), "study": study},
            tune_config=tune.TuneConfig(max_concurrent_trials=config.sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name=f"grid-{key}-{int(time.time())}", storage_path=storage_path,
                                      callbacks=[RowWriter(out, rows_uri)], progress_reporter=progress_table(),
                                      verbose=1, failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES)),
        )
        tuner.fit()
    results = collect_results(out)
    missing = [cell["trial_id"] for cell in cells if cell["trial_id"] not in set(results.get("trial_id", []))]
    if missing:
        raise RuntimeError(f"{len(missing)} trial(s) did not finish: {', '.join(missing)}; rerun with --resume")
    teachers = results[results["strategy"] == "teacher"]["mlm_val_loss"]
    facts["references"]["teacher_mlm_val_loss"] = float(teachers.mean()) if len(teachers) else None
    record_study(out, config, key, **facts)
    return results


def teacher_ledger(config: StudyConfig, teacher_dir: str | None) -> dict:
    """The teacher control's pretraining columns: its own budget and ledger (a given teacher's are unknown)."""
    record = teacher_record(teacher_dir) if teacher_dir else None
    unknown = {key: math.nan for key in ("flops", "teacher_flops", "tokens", "device_seconds", "unique_tokens",
                                         "epochs", "steps")}
    if record is None:
        return {**unknown, "budget_unit": config.teacher.budget_unit}
    return {**unknown, **{key: record[key] for key in unknown if key in record},
            "budget_unit": config.teacher.budget_unit}


def chance_levels(config: StudyConfig, tasks_dir: Path | None) -> dict:
    """Each task's score for a constant prediction (the train split's majority answer; 0 for correlations)."""
    from raykd.evaluation import chance_score

    evaluation = config.eval
    return {task: chance_score(task, str(tasks_dir) if tasks_dir else None,
                               max_eval_examples=evaluation.validation_examples, seed=config.seeds[0])
            for task in evaluation.tasks}


def pretrain_cell(config: StudyConfig, cache_dir: str | Path | None = None,
                  storage: str | None = None) -> tuple[dict, float]:
    """Pretrain the first cell of the grid on Ray Train (no Tune, no GLUE).

    Returns the trial's summary and one step's charge in the budget unit
    (flops or tokens; every step costs the same, the masking draws an exact count).
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    meta_path = prepare_data(config, cache)
    meta = load_meta(meta_path)
    storage_path = storage_root(storage, cache / "runs")
    measured = calibration(config, meta_path, meta, storage_path, config_hash(config.to_dict(), "pretrain"))
    cell = plan_cells(config, meta, _rate(measured))[0]
    start_ray(config)
    teacher_dir = ensure_teacher(config, meta_path, cache, storage_path)[0] if needs_teacher(cell["strategy"]) else None
    from raykd.ray_train import TrialSpec, run_pretraining

    spec = TrialSpec(strategy=cell["strategy"], budget=cell["budget"], unique_examples=cell["unique_examples"],
                     seed=cell["seed"], peak_lr=config.train.lr,
                     **trial_spec_fields(config, publish_data(meta_path, storage_path), meta, teacher_dir))
    summary = run_pretraining(spec, storage_path, name=f"pretrain-{cell['trial_id']}-{int(time.time())}")
    global_batch = config.train.per_worker_batch * config.train.workers
    masked = global_batch * masked_per_sequence(meta["seq_len"], config.data.mask_prob, meta["special_ids"],
                                                meta["vocab_size"])
    shape, teacher_shape = config.student, config.teacher.shape
    strategy = build_strategy(cell["strategy"], shape, teacher_shape, config.strategy_options)
    charge = step_flops(strategy, shape, teacher_shape, meta["vocab_size"], global_batch, meta["seq_len"], masked).total
    return summary, charge if config.budget_unit == "flops" else float(global_batch * meta["seq_len"])


def pretrain_for_tuning(trial_config: dict) -> None:
    """A Tune trial of the LR search: pretrain one cell at the sampled LR; Train's reports drive ASHA."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from raykd.ray_train import TrialSpec, run_pretraining

    cell, study = trial_config["cell"], trial_config["study"]
    spec = TrialSpec(strategy=cell["strategy"], budget=cell["budget"] * study["budget_fraction"],
                     unique_examples=cell["unique_examples"], seed=cell["seed"], peak_lr=trial_config["lr"],
                     **study["spec"])
    name = f"tune-{study['key']}-{tune.get_context().get_trial_id()}"
    summary = run_pretraining(spec, study["storage"], name=name, callbacks=[TuneReportCallback()])
    last = summary["curve"][-1]
    tune.report({"val_loss": last["val_loss"], "mlm_val_loss": last["mlm_val_loss"], "budget_fraction": 1.0})


def tune_learning_rates(config: StudyConfig, out: str | Path, storage: str | None = None,
                        cache_dir: str | Path | None = None) -> dict:
    """Optuna (TPE) + ASHA over the peak LR, per (strategy, budget); winners go to out/tuned_lr.json.

    The objective is the strategy's own validation loss (`val_loss`): the MLM loss for
    `scratch` and `vanilla_kd`'s mix, the distillation loss for `tinybert` and `minilm`,
    whose losses never train the LM head. Each search uses the first repetition's pool
    and the first seed.
    """
    out = Path(out).resolve()
    with hold(out, "tune_lr.py"):
        return _tune_learning_rates(config, out, storage, cache_dir)


def _tune_learning_rates(config: StudyConfig, out: Path, storage: str | None, cache_dir: str | Path | None) -> dict:
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    storage_path = storage_root(storage, out / "ray")
    meta_path = prepare_data(config, cache, storage_path)
    meta = load_meta(meta_path)
    start_ray(config)
    measured = calibration(config, meta_path, meta, storage_path, config_hash(config.to_dict(), str(out)), out)
    cells = [c for c in plan_cells(config, meta, _rate(measured))
             if c["repetition"] == config.repetitions[0] and c["seed"] == config.seeds[0]]
    teacher_dir = (ensure_teacher(config, meta_path, cache, storage_path)[0]
                   if any(needs_teacher(cell["strategy"]) for cell in cells) else None)
    key = config_hash(config.to_dict(), str(out), "tune")
    study = {"spec": trial_spec_fields(config, publish_data(meta_path, storage_path), meta, teacher_dir),
             "storage": storage_path, "key": key,
             "trial_cpus": config.sweep.trial_cpus, "budget_fraction": config.tune.budget_fraction}
    path = out / TUNED_LR_FILE
    tuned = json.loads(path.read_text()) if path.exists() else {"lr": {}, "searches": {}}
    for cell in cells:
        scheduler = ASHAScheduler(time_attr="budget_fraction", max_t=1.0,
                                  grace_period=config.tune.grace_points / config.train.eval_points, reduction_factor=2)
        tuner = tune.Tuner(
            tune.with_resources(pretrain_for_tuning, trial_resources),
            param_space={"lr": tune.loguniform(config.tune.lr_min, config.tune.lr_max), "cell": cell, "study": study},
            tune_config=tune.TuneConfig(metric="val_loss", mode="min", num_samples=config.tune.trials,
                                        search_alg=OptunaSearch(seed=cell["seed"]), scheduler=scheduler,
                                        max_concurrent_trials=config.sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name=f"tune-lr-{cell['trial_id']}-{int(time.time())}", storage_path=storage_path,
                                      progress_reporter=progress_table(lr="lr"), verbose=1),
        )
        results = tuner.fit()
        best = results.get_best_result(metric="val_loss", mode="min", scope="last")
        lr = float(best.config["lr"])
        tuned["lr"].setdefault(cell["strategy"], {})[number_key(cell["budget"])] = lr
        tuned["searches"][cell["trial_id"]] = {
            "best_lr": lr, "best_val_loss": float(best.metrics["val_loss"]),
            "trials": [{"lr": float(r.config["lr"]), "val_loss": float(r.metrics.get("val_loss", math.nan)),
                        "budget_fraction": float(r.metrics.get("budget_fraction", math.nan))} for r in results]}
        atomic_write_text(path, json.dumps(tuned, indent=1))  # each finished search is kept even if a later one fails
    return tuned


def summary_table(results: pd.DataFrame) -> str:
    """Strategy × budget × repetition → tokens, passes, MLM loss, GLUE score (means over seeds)."""
    columns = ["tokens", "epochs", "mlm_val_loss", "glue_score"]
    table = results.groupby(["budget", "repetition", "strategy"], sort=True, dropna=False)[columns].mean()
    return table.to_string(float_format=lambda v: f"{v:.4g}" if not math.isnan(v) else "nan")
