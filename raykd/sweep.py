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
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from ray import tune

from raykd import storage as store
from raykd.config import ConfigError, StudyConfig
from raykd.data.masking import mask_batch
from raykd.data.shards import load_meta
from raykd.data.stream import unique_examples_for, unique_examples_from_tokens
from raykd.flops import step_flops
from raykd.strategies import build_strategy
from raykd.stages import (config_hash, default_cache_dir, ensure_teacher, prepare_data, prepare_tasks, publish_data,
                          publish_tasks)

TRIALS_DIR = "trials"
RESULTS_FILE = "results.parquet"
CURVES_FILE = "curves.parquet"
STUDY_FILE = "study.json"
TUNED_LR_FILE = "tuned_lr.json"
# A trial whose node is lost (a spot reclaim) starts again on another node and resumes from its
# last checkpoint in the storage; a trial that fails this often has a real error.
TRIAL_RETRIES = 3


def budget_key(budget: float) -> str:
    """How a budget names itself in trial ids and the tuned-LR file."""
    return f"{budget:g}"


def trial_id(strategy: str, budget: float, repetition: float, seed: int) -> str:
    return f"{strategy}-b{budget_key(budget)}-r{repetition:g}-s{seed}"


def masked_per_sequence(seq_len: int, mask_prob: float, special_ids: dict, vocab_size: int) -> int:
    """Masked positions in one packed sequence (the masking draws an exact count)."""
    ids = np.full((1, seq_len), special_ids["mask"] + 1, dtype=np.int64)
    ids[0, 0], ids[0, -1] = special_ids["cls"], special_ids["sep"]
    _, labels = mask_batch(ids, np.zeros(1, dtype=np.int64), 0, 0, special_ids=special_ids,
                           vocab_size=vocab_size, mask_prob=mask_prob)
    return int((labels != -100).sum())


def scratch_tokens(config: StudyConfig, budget: float, meta: dict) -> int:
    """T_scratch: tokens `scratch` processes at this budget (SPEC §4), from the same charge the trial uses."""
    train, seq_len = config.train, meta["seq_len"]
    global_batch = train.per_worker_batch * train.workers
    tokens_per_step = global_batch * seq_len
    if config.budget_unit == "tokens":
        steps = int(budget // tokens_per_step)
    elif config.budget_unit == "flops":
        shape = config.student.model_shape()
        masked = global_batch * masked_per_sequence(seq_len, config.data.mask_prob, meta["special_ids"], meta["vocab_size"])
        charge = step_flops(build_strategy("scratch", shape, None, config.strategy_options.options()), shape, None,
                            meta["vocab_size"], global_batch, seq_len, masked).total
        steps = int(budget // charge)
    else:
        steps = int(budget * config.train.tokens_per_device_second // tokens_per_step)
    return steps * tokens_per_step


def plan_cells(config: StudyConfig, meta: dict) -> list[dict]:
    """The grid: one cell per (budget, repetition, seed, strategy), with its pool size."""
    cells = []
    available = meta["splits"]["train"]["num_examples"]
    for budget in config.budgets:
        tokens = scratch_tokens(config, budget, meta)
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


def learning_rates(config: StudyConfig, out: Path) -> tuple[dict, str | None]:
    """Tuned peak LRs {strategy: {budget_key: lr}} and the file they came from (None: config's)."""
    path = Path(config.train.lr_file) if config.train.lr_file else out / TUNED_LR_FILE
    if not path.is_file():
        return {}, None
    try:
        tuned = json.loads(path.read_text())["lr"]
    except (ValueError, KeyError) as error:
        raise ConfigError("train.lr_file", f"{path} is not a tuned-LR file: {error}") from None
    return tuned, str(path)


def lr_for(cell: dict, tuned: dict, source: str | None, default: float) -> tuple[float, str]:
    lr = tuned.get(cell["strategy"], {}).get(budget_key(cell["budget"]))
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
        strategy_options=asdict(config.strategy_options), workers=train.workers,
        cpus_per_worker=train.cpus_per_worker, gpus_per_worker=train.gpus_per_worker, num_threads=train.num_threads,
        per_worker_batch=train.per_worker_batch, mask_prob=config.data.mask_prob, betas=tuple(train.betas),
        eps=train.eps, weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm, dropout=train.dropout,
        checkpoint_every=train.checkpoint_every, eval_points=train.eval_points,
        validation_examples=train.validation_examples)


def pretrain_and_evaluate(trial_config: dict) -> None:
    """A Tune trial: pretrain one cell on Ray Train, fine-tune it on every task, report its row."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from raykd.evaluation import evaluate_student
    from raykd.ray_train import TrialSpec, run_pretraining

    cell, study = trial_config["cell"], trial_config["study"]
    started = time.time()
    spec = TrialSpec(strategy=cell["strategy"], budget=cell["budget"], unique_examples=cell["unique_examples"],
                     seed=cell["seed"], peak_lr=cell["lr"], **study["spec"])
    summary = run_pretraining(spec, study["storage"], name=f"{study['key']}-{cell['trial_id']}",
                              callbacks=[TuneReportCallback()])
    evaluation = study["eval"]
    tasks_dir = store.local_copy(study["tasks_dir"]) if study["tasks_dir"] else None
    with store.local_folder(summary["checkpoint"]) as student_dir:
        scores = evaluate_student(student_dir, store.local_copy(study["tokenizer_dir"]), evaluation["tasks"],
                                  data_dir=tasks_dir, learning_rates=evaluation["learning_rates"],
                                  batch_sizes=evaluation["batch_sizes"], epochs=evaluation["epochs"],
                                  max_seq_len=evaluation["max_seq_len"], seed=cell["seed"],
                                  max_train_examples=evaluation["train_examples"],
                                  max_eval_examples=evaluation["validation_examples"], num_threads=spec.num_threads)
    row = {**{k: cell[k] for k in ("trial_id", "strategy", "budget", "repetition", "seed")},
           "budget_unit": spec.budget_unit, "flops": summary["flops"], "teacher_flops": summary["teacher_flops"],
           "tokens": summary["tokens"], "device_seconds": summary["device_seconds"],
           "unique_tokens": summary["unique_tokens"], "epochs": summary["epochs"], "steps": summary["steps"],
           "lr": cell["lr"], "lr_source": cell["lr_source"], "mlm_val_loss": summary["mlm_val_loss"],
           "kd_loss": summary["kd_loss"], **scores["scores"], "glue_score": scores["glue_score"],
           "checkpoint": summary["checkpoint"], "wall_seconds": time.time() - started,
           "curve": json.dumps(summary["curve"])}
    tune.report({"glue_score": row["glue_score"], "row_json": json.dumps(row, default=float)})


def trial_resources(trial_config: dict) -> tune.PlacementGroupFactory:
    """The trial process's share, plus one bundle per teacher actor it starts (Tune requires the slots).

    The training workers are not in it: Ray Train gives them a placement group of their own.
    """
    cell, spec = trial_config["cell"], trial_config["study"]["spec"]
    bundles = [{"CPU": trial_config["study"]["trial_cpus"]}]
    if cell["strategy"] != "scratch" and spec["teacher_placement"] == "actor":
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


def write_row(out: Path, row: dict) -> None:
    """Atomically write one trial's row."""
    folder = out / TRIALS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{row['trial_id']}.json"
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(row, default=float))
    os.replace(staging, path)


def finished_rows(out: Path) -> list[dict]:
    folder = out / TRIALS_DIR
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


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
    staging = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(staging, index=False)
    os.replace(staging, path)


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


def check_output(out: Path, resume: bool) -> None:
    """Refuse to mix a new study into a folder holding another's results, unless resuming."""
    if finished_rows(out) and not resume:
        raise ConfigError("out", f"{out} already holds finished trials; pass --resume to complete that study "
                                 f"or choose another --out")


def start_ray(config: StudyConfig) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray with the preset's logical CPUs."""
    if ray.is_initialized():
        return
    if "RAY_ADDRESS" in os.environ:
        ray.init()
    else:
        ray.init(num_cpus=config.sweep.ray_cpus, include_dashboard=False,
                 runtime_env={"worker_process_setup_hook": "raykd.logs.quiet_placement_group_cleaner"})


def storage_root(storage: str | None, default: Path) -> str:
    """The storage every node shares, as they all name it (`--storage`, else the local `default`)."""
    try:
        return store.root(storage or default)
    except ValueError as error:
        raise ConfigError("storage", str(error)) from None


def run_study(config: StudyConfig, out: str | Path, storage: str | None = None, resume: bool = False,
              cache_dir: str | Path | None = None) -> pd.DataFrame:
    """Run (or resume) the whole study; returns the results DataFrame (also at out/results.parquet)."""
    out = Path(out).resolve()
    check_output(out, resume)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    storage_path = storage_root(storage, out / "ray")
    meta_path = prepare_data(config, cache, storage_path)
    meta = load_meta(meta_path)
    cells = plan_cells(config, meta)  # pool sizes checked against the corpus before any training
    tuned, tuned_source = learning_rates(config, out)
    tasks_dir = prepare_tasks(config, cache)
    start_ray(config)
    out.mkdir(parents=True, exist_ok=True)
    key = config_hash(config.to_dict(), str(out))
    (out / STUDY_FILE).write_text(json.dumps({"name": config.name, "tasks": config.eval.tasks, "key": key,
                                              "config": config.to_dict()}, indent=1))
    rows_uri = store.join(storage_path, store.STUDIES, key, TRIALS_DIR)
    sync_rows(out, rows_uri, resume)
    done = {row["trial_id"] for row in finished_rows(out)}
    todo = [cell for cell in cells if cell["trial_id"] not in done]
    if todo:
        needs_teacher = any(cell["strategy"] != "scratch" for cell in todo)
        teacher_dir = ensure_teacher(config, meta_path, cache, storage_path)[0] if needs_teacher else None
        for cell in todo:
            cell["lr"], cell["lr_source"] = lr_for(cell, tuned, tuned_source, config.train.lr)
        meta_uri = publish_data(meta_path, storage_path)
        study = {"spec": trial_spec_fields(config, meta_uri, meta, teacher_dir), "storage": storage_path,
                 "key": key, "trial_cpus": config.sweep.trial_cpus,
                 "tokenizer_dir": store.join(meta_uri.rsplit("/", 1)[0], meta["tokenizer"]),
                 "tasks_dir": publish_tasks(tasks_dir, storage_path), "eval": asdict(config.eval)}
        trainable = tune.with_resources(pretrain_and_evaluate, trial_resources)
        tuner = tune.Tuner(
            trainable,
            param_space={"cell": tune.grid_search(todo), "study": study},
            tune_config=tune.TuneConfig(max_concurrent_trials=config.sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name=f"grid-{key}-{int(time.time())}", storage_path=storage_path,
                                      callbacks=[RowWriter(out, rows_uri)], verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES)),
        )
        tuner.fit()
    results = collect_results(out)
    missing = [cell["trial_id"] for cell in cells if cell["trial_id"] not in set(results.get("trial_id", []))]
    if missing:
        raise RuntimeError(f"{len(missing)} trial(s) did not finish: {', '.join(missing)}; rerun with --resume")
    return results


def pretrain_cell(config: StudyConfig, cache_dir: str | Path | None = None,
                  storage: str | None = None) -> tuple[dict, float]:
    """Pretrain the first cell of the grid on Ray Train (no Tune, no GLUE).

    Returns the trial's summary and one step's charge in the budget unit
    (flops or tokens; every step costs the same, the masking draws an exact count).
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    meta_path = prepare_data(config, cache)
    meta = load_meta(meta_path)
    cell = plan_cells(config, meta)[0]
    start_ray(config)
    storage_path = storage_root(storage, cache / "runs")
    teacher_dir = ensure_teacher(config, meta_path, cache, storage_path)[0] if cell["strategy"] != "scratch" else None
    from raykd.ray_train import TrialSpec, run_pretraining

    spec = TrialSpec(strategy=cell["strategy"], budget=cell["budget"], unique_examples=cell["unique_examples"],
                     seed=cell["seed"], peak_lr=config.train.lr,
                     **trial_spec_fields(config, publish_data(meta_path, storage_path), meta, teacher_dir))
    summary = run_pretraining(spec, storage_path, name=f"pretrain-{cell['trial_id']}-{int(time.time())}")
    global_batch = config.train.per_worker_batch * config.train.workers
    masked = global_batch * masked_per_sequence(meta["seq_len"], config.data.mask_prob, meta["special_ids"],
                                                meta["vocab_size"])
    shape, teacher_shape = config.student.model_shape(), config.teacher.shape.model_shape()
    strategy = build_strategy(cell["strategy"], shape, teacher_shape, config.strategy_options.options())
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
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    out = Path(out).resolve()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    storage_path = storage_root(storage, out / "ray")
    meta_path = prepare_data(config, cache, storage_path)
    meta = load_meta(meta_path)
    start_ray(config)
    cells = [c for c in plan_cells(config, meta) if c["repetition"] == config.repetitions[0] and c["seed"] == config.seeds[0]]
    out.mkdir(parents=True, exist_ok=True)
    needs_teacher = any(cell["strategy"] != "scratch" for cell in cells)
    teacher_dir = ensure_teacher(config, meta_path, cache, storage_path)[0] if needs_teacher else None
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
                                      verbose=1),
        )
        results = tuner.fit()
        best = results.get_best_result(metric="val_loss", mode="min", scope="last")
        lr = float(best.config["lr"])
        tuned["lr"].setdefault(cell["strategy"], {})[budget_key(cell["budget"])] = lr
        tuned["searches"][cell["trial_id"]] = {
            "best_lr": lr, "best_val_loss": float(best.metrics["val_loss"]),
            "trials": [{"lr": float(r.config["lr"]), "val_loss": float(r.metrics.get("val_loss", math.nan)),
                        "budget_fraction": float(r.metrics.get("budget_fraction", math.nan))} for r in results]}
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(json.dumps(tuned, indent=1))
        os.replace(staging, path)  # each finished search is kept even if a later one fails
    return tuned


def summary_table(results: pd.DataFrame) -> str:
    """Strategy × budget × repetition → tokens, passes, MLM loss, GLUE score (means over seeds)."""
    columns = ["tokens", "epochs", "mlm_val_loss", "glue_score"]
    table = results.groupby(["budget", "repetition", "strategy"], sort=True)[columns].mean()
    return table.to_string(float_format=lambda v: f"{v:.4g}" if not math.isnan(v) else "nan")
