"""The recipes the entry scripts run: the study, the LR search, one cell — each set up by one stage preamble.

`run_study(config, out, storage, resume)` is what `sweeps/grid.py` calls:
1. everything is validated before compute (config, corpus size vs. pools, output folder);
2. stages (`Stages`): corpus shards, embedded tasks, the teacher (each cached by hash);
3. one Tune trial per grid cell (`raykd.trainables.pretrain_and_evaluate`): a
   `TorchTrainer` (Train V2 inside a Tune function), then fine-tuning on every task;
4. each finished trial's row is written at once, atomically, to
   `out/trials/<trial_id>.json` and to `<storage>/studies/<key>/trials/`, and
   `out/results.parquet` is rebuilt from them.
Trials read only from the storage (`raykd.storage`): the stages are published
there, the students are checkpointed there, and evaluation downloads them.
`--resume` skips the cells that have a row (in `out` or in the storage: a new
head node with an empty `out` finds them there); an interrupted cell resumes
from its last Train checkpoint in the storage (its Train run name is deterministic).

`tune_learning_rates` (sweeps/tune_lr.py) and `pretrain_cell` (sweeps/pretrain.py)
share the same preamble.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import ray
from ray import tune

from raykd import storage as store
from raykd.config import CONTROLS, ConfigError, StudyConfig
from raykd.data.meta import load_meta
from raykd.data.shards import unigram_entropy
from raykd.io import atomic_path, atomic_write_text
from raykd.plan import (TUNED_LR_FILE, control_cells, learning_rates, number_key, plan_cells, step_charge,
                        uses_teacher, with_tuned_lr)
from raykd.ray_train import Corpus, TrialSpec
from raykd.stages import (config_hash, default_cache_dir, ensure_teacher, prepare_data, prepare_tasks, publish_data,
                          publish_tasks, teacher_record)
from raykd.study_folder import (STUDY_FILE, TRIALS_DIR, bound_fields, check_binding, finished_rows, hold,
                                record_study, write_row)
from raykd.trainables import StudyRun, pretrain_and_evaluate, pretrain_for_tuning, progress_table, trial_resources

RESULTS_FILE = "results.parquet"
CURVES_FILE = "curves.parquet"
# A trial whose node is lost (a spot reclaim) starts again on another node and resumes from its
# last checkpoint in the storage; a trial that fails this often has a real error.
TRIAL_RETRIES = 3
# What every Ray worker gets unless --verbose: no per-batch Ray Data progress bars or INFO lines
# ("Estimated parquet encoding ratio"), no transformers "Loading weights" bars.
QUIET_WORKERS = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_LOG_LEVEL": "WARNING",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@dataclass
class Stages:
    """The stage preamble every recipe shares: the storage all nodes read, the corpus (built, or
    fetched from the storage, into the driver's cache) and its metadata; then, for the trials,
    the corpus and the teacher published to the storage (`for_trials`)."""

    config: StudyConfig
    cache: Path
    storage: str
    meta_path: Path  # the corpus in the driver's cache
    meta: dict

    @classmethod
    def prepare(cls, config: StudyConfig, cache_dir: str | Path | None, storage: str | None,
                default_storage: Path | None = None) -> "Stages":
        """Storage `storage` (else `default_storage`, else the cache's `runs/`) and the corpus."""
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        storage_path = storage_root(storage, default_storage or cache / "runs")
        meta_path = prepare_data(config, cache, storage_path)
        return cls(config, cache, storage_path, meta_path, load_meta(meta_path))

    def for_trials(self, strategies) -> tuple[Corpus, str | None]:
        """The corpus and, if one of `strategies` uses it, the teacher (pretrained once, cached), as trials
        reach them in the storage."""
        teacher_dir = None
        if any(uses_teacher(strategy) for strategy in strategies):
            teacher_dir = ensure_teacher(self.config, self.meta_path, self.cache, self.storage)[0]
        return Corpus.of(publish_data(self.meta_path, self.storage), self.meta), teacher_dir

    def calibration(self, key: str, out: Path | None = None) -> dict | None:
        return calibration(self.config, self.meta_path, self.meta, self.storage, key, out)


def storage_root(storage: str | None, default: Path) -> str:
    """The storage every node shares, as they all name it (`--storage`, else the local `default`)."""
    try:
        return store.root(storage or default)
    except ValueError as error:
        raise ConfigError("storage", str(error)) from None


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
        config, Corpus.of(str(meta_path), meta), meta["splits"]["train"]["num_examples"], storage_path,
        name=f"calibrate-{key}-{int(time.time())}")


def _rate(measured: dict | None) -> float | None:
    return measured["tokens_per_device_second"] if measured else None


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
    stages = Stages.prepare(config, cache_dir, storage, out / "ray")
    key = config_hash(bound_fields(config), str(out))  # names the Train runs: a resume finds their checkpoints
    measured = stages.calibration(key, out)
    # Controls first: a study cut short still has its references. Pool sizes are checked before the grid.
    cells = control_cells(config) + plan_cells(config, stages.meta, _rate(measured))
    tuned, tuned_source = learning_rates(config, out)
    tasks_dir = prepare_tasks(config, stages.cache)
    start_ray(config, verbose)
    facts = {"calibration": measured, "chance": chance_levels(config, tasks_dir),
             "references": {"unigram_entropy": unigram_entropy(stages.meta_path)}}
    record_study(out, config, key, **facts)
    rows_uri = store.join(stages.storage, store.STUDIES, key, TRIALS_DIR)
    sync_rows(out, rows_uri, resume)
    done = {row["trial_id"] for row in finished_rows(out)}
    todo = [cell if cell.strategy in CONTROLS else with_tuned_lr(cell, tuned, tuned_source, config.train.lr)
            for cell in cells if cell.trial_id not in done]
    if todo:
        corpus, teacher_dir = stages.for_trials(cell.strategy for cell in todo)
        study = StudyRun(config, {cell.trial_id: cell for cell in todo}, corpus, stages.storage, key,
                         teacher_dir=teacher_dir,
                         tokenizer_dir=store.join(corpus.meta_path.rsplit("/", 1)[0], stages.meta["tokenizer"]),
                         tasks_dir=publish_tasks(tasks_dir, stages.storage),
                         teacher_ledger=teacher_ledger(config, teacher_dir))
        tuner = tune.Tuner(
            tune.with_resources(pretrain_and_evaluate, trial_resources),
            param_space={"cell": tune.grid_search([cell.labels() for cell in todo]), "study": study},
            tune_config=tune.TuneConfig(max_concurrent_trials=config.sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name=f"grid-{key}-{int(time.time())}", storage_path=stages.storage,
                                      callbacks=[RowWriter(out, rows_uri)], progress_reporter=progress_table(),
                                      verbose=1, failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES)),
        )
        tuner.fit()
    results = collect_results(out)
    missing = [cell.trial_id for cell in cells if cell.trial_id not in set(results.get("trial_id", []))]
    if missing:
        raise RuntimeError(f"{len(missing)} trial(s) did not finish: {', '.join(missing)}; rerun with --resume")
    teachers = results[results["strategy"] == "teacher"]["mlm_val_loss"]
    facts["references"]["teacher_mlm_val_loss"] = float(teachers.mean()) if len(teachers) else None
    record_study(out, config, key, **facts)
    return results


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

    stages = Stages.prepare(config, cache_dir, storage, out / "ray")
    start_ray(config)
    measured = stages.calibration(config_hash(config.to_dict(), str(out)), out)
    cells = [cell for cell in plan_cells(config, stages.meta, _rate(measured))
             if cell.repetition == config.repetitions[0] and cell.seed == config.seeds[0]]
    corpus, teacher_dir = stages.for_trials(cell.strategy for cell in cells)
    key = config_hash(config.to_dict(), str(out), "tune")
    study = StudyRun(config, {cell.trial_id: cell for cell in cells}, corpus, stages.storage, key,
                     teacher_dir=teacher_dir)
    path = out / TUNED_LR_FILE
    tuned = json.loads(path.read_text()) if path.exists() else {"lr": {}, "searches": {}}
    for cell in cells:
        scheduler = ASHAScheduler(time_attr="budget_fraction", max_t=1.0,
                                  grace_period=config.tune.grace_points / config.train.eval_points, reduction_factor=2)
        tuner = tune.Tuner(
            tune.with_resources(pretrain_for_tuning, trial_resources),
            param_space={"lr": tune.loguniform(config.tune.lr_min, config.tune.lr_max), "cell": cell.labels(),
                         "study": study},
            tune_config=tune.TuneConfig(metric="val_loss", mode="min", num_samples=config.tune.trials,
                                        search_alg=OptunaSearch(seed=cell.seed), scheduler=scheduler,
                                        max_concurrent_trials=config.sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name=f"tune-lr-{cell.trial_id}-{int(time.time())}",
                                      storage_path=stages.storage, progress_reporter=progress_table(lr="lr"),
                                      verbose=1),
        )
        results = tuner.fit()
        best = results.get_best_result(metric="val_loss", mode="min", scope="last")
        lr = float(best.config["lr"])
        tuned["lr"].setdefault(cell.strategy, {})[number_key(cell.budget)] = lr
        tuned["searches"][cell.trial_id] = {
            "best_lr": lr, "best_val_loss": float(best.metrics["val_loss"]),
            "trials": [{"lr": float(r.config["lr"]), "val_loss": float(r.metrics.get("val_loss", math.nan)),
                        "budget_fraction": float(r.metrics.get("budget_fraction", math.nan))} for r in results]}
        atomic_write_text(path, json.dumps(tuned, indent=1))  # each finished search is kept even if a later one fails
    return tuned


def pretrain_cell(config: StudyConfig, cache_dir: str | Path | None = None,
                  storage: str | None = None) -> tuple[dict, float]:
    """Pretrain the first cell of the grid on Ray Train (no Tune, no GLUE).

    Returns the trial's summary and one step's charge in the budget unit
    (flops or tokens; every step costs the same, the masking draws an exact count).
    """
    from raykd.ray_train import run_pretraining

    stages = Stages.prepare(config, cache_dir, storage)
    measured = stages.calibration(config_hash(config.to_dict(), "pretrain"))
    cell = replace(plan_cells(config, stages.meta, _rate(measured))[0], lr=config.train.lr)
    start_ray(config)
    corpus, teacher_dir = stages.for_trials([cell.strategy])
    summary = run_pretraining(TrialSpec(config, cell, corpus, teacher_dir), stages.storage,
                              name=f"pretrain-{cell.trial_id}-{int(time.time())}")
    if config.budget_unit == "flops":
        return summary, step_charge(config, stages.meta, cell.strategy)
    return summary, float(config.train.per_worker_batch * config.train.workers * stages.meta["seq_len"])


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


def summary_table(results: pd.DataFrame) -> str:
    """Strategy × budget × repetition → tokens, passes, MLM loss, GLUE score (means over seeds)."""
    columns = ["tokens", "epochs", "mlm_val_loss", "glue_score"]
    table = results.groupby(["budget", "repetition", "strategy"], sort=True, dropna=False)[columns].mean()
    return table.to_string(float_format=lambda v: f"{v:.4g}" if not math.isnan(v) else "nan")
