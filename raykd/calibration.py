"""Calibration of `device_seconds` budgets: scratch tokens per device-second, measured where trials run.

A device-second budget is spent in time, but the repetition pool (SPEC §4:
U = T_scratch / r) is counted in tokens, so T_scratch needs the rate at which
`scratch` turns device time into tokens. Before the grid, a short `scratch`
run on Ray Train, with the trials' own workers, resources, batch, precision
and compile setting, measures that rate; the study records it in study.json.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

from raykd.config import CALIBRATION_WARMUP_STEPS, StudyConfig


def measure_tokens_per_device_second(config: StudyConfig, corpus, available_examples: int, storage_path: str,
                                     name: str) -> dict:
    """Run `train.calibration_steps` scratch steps on Ray Train and measure tokens per device-second.

    corpus: the study's `raykd.ray_train.Corpus`. The run uses the first seed and `train.lr`.
    The first CALIBRATION_WARMUP_STEPS steps (allocator, kernel selection,
    compilation) are left out of the rate. Returns what study.json records:
    tokens_per_device_second, steps and tokens measured, the device-seconds
    they took, the device and the number of training workers.
    """
    from raykd.plan import Cell
    from raykd.ray_train import TrialSpec, run_pretraining

    train, steps = config.train, config.train.calibration_steps
    global_batch = train.per_worker_batch * train.workers
    tokens_per_step = global_batch * corpus.seq_len
    # one checkpoint and one small validation, at the end: nothing interrupts the timed steps
    calibrated = replace(config, budget_unit="tokens", train=replace(
        train, checkpoint_every=steps, eval_points=1, validation_examples=train.per_worker_batch))
    cell = Cell("scratch", float(steps * tokens_per_step), math.nan, config.seeds[0],
                unique_examples=min(available_examples, steps * global_batch), lr=train.lr)
    started = time.time()
    summary = run_pretraining(TrialSpec(calibrated, cell, corpus), storage_path, name=name)
    return {**rate_from_curve(summary["curve"]), "device": summary["device"], "workers": train.workers,
            "wall_seconds": time.time() - started, "source": "measured"}


def rate_from_curve(curve: list[dict], warmup_steps: int = CALIBRATION_WARMUP_STEPS) -> dict:
    """Tokens per device-second over a run's steps after the first `warmup_steps`.

    curve: the trial's per-step rows, each with the cumulative ledger (`tokens`,
    `device_seconds`) after that step; the final row (validation) is not a step.
    """
    rows = [row for row in curve if not row.get("final")]
    if len(rows) < warmup_steps + 2:
        raise RuntimeError(f"calibration ran {len(rows)} steps; needs at least {warmup_steps + 2}")
    first, last = rows[warmup_steps - 1], rows[-1]
    tokens = last["tokens"] - first["tokens"]
    seconds = last["device_seconds"] - first["device_seconds"]
    return {"tokens_per_device_second": tokens / seconds, "steps": last["step"] - first["step"], "tokens": tokens,
            "seconds": seconds, "warmup_steps": warmup_steps}
