"""The grid of a study: its cells, their data pools, their peak learning rates.

One `Cell` per (budget, repetition, seed, strategy) — `plan_cells` — and one per
(control, seed) — `control_cells`. A cell's pool (SPEC §4) is U = T_scratch / r,
where T_scratch is what `scratch` processes at that budget, charged exactly as
the trial charges it (`step_charge`). A cell's peak LR is the tuned one
(`sweeps/tune_lr.py` writes it, `learning_rates` reads it) or `train.lr`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from raykd.config import CONTROLS, ConfigError, StudyConfig
from raykd.data.masking import mask_batch
from raykd.data.stream import unique_examples_for, unique_examples_from_tokens
from raykd.flops import step_flops
from raykd.strategies import build_strategy, needs_teacher

TUNED_LR_FILE = "tuned_lr.json"


def number_key(value: float) -> str:
    """A number as it names itself in trial ids and the tuned-LR file: short (`3e+10`) where that
    reads back as the same float, exact otherwise (3.0000001e10 and 3.0000002e10 never collide)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def trial_id(strategy: str, budget: float, repetition: float, seed: int) -> str:
    """The grid cell's name; distinct cells (distinct axis values) get distinct ids."""
    return f"{strategy}-b{number_key(budget)}-r{number_key(repetition)}-s{seed}"


@dataclass(frozen=True)
class Cell:
    """One trial of a study: a strategy (or a control) at a budget, repetition and seed, with its
    unique pool in examples and its peak LR (controls: no pool, no pretraining LR of their own)."""

    strategy: str
    budget: float
    repetition: float
    seed: int
    unique_examples: int = 0
    scratch_tokens: int = 0
    lr: float = math.nan
    lr_source: str = ""

    @property
    def trial_id(self) -> str:
        if self.strategy in CONTROLS:
            return f"{self.strategy}-s{self.seed}"
        return trial_id(self.strategy, self.budget, self.repetition, self.seed)

    def labels(self) -> dict:
        """The cell as Tune shows it in its live table (plain values)."""
        return {"trial_id": self.trial_id, "strategy": self.strategy, "budget": self.budget,
                "repetition": self.repetition, "seed": self.seed}


def uses_teacher(strategy: str) -> bool:
    """Whether a cell needs the teacher: a strategy that distils, or the `teacher` control."""
    if strategy in CONTROLS:
        return strategy == "teacher"
    return needs_teacher(strategy)


def masked_per_sequence(seq_len: int, mask_prob: float, special_ids: dict, vocab_size: int) -> int:
    """Masked positions in one packed sequence (the masking draws an exact count)."""
    ids = np.full((1, seq_len), special_ids["mask"] + 1, dtype=np.int64)
    ids[0, 0], ids[0, -1] = special_ids["cls"], special_ids["sep"]
    _, labels = mask_batch(ids, np.zeros(1, dtype=np.int64), 0, 0, special_ids=special_ids,
                           vocab_size=vocab_size, mask_prob=mask_prob)
    return int((labels != -100).sum())


def step_charge(config: StudyConfig, meta: dict, strategy: str) -> float:
    """FLOPs of one global training step of `strategy` on this corpus (every step costs the same)."""
    global_batch = config.train.per_worker_batch * config.train.workers
    seq_len = meta["seq_len"]
    masked = global_batch * masked_per_sequence(seq_len, config.data.mask_prob, meta["special_ids"], meta["vocab_size"])
    built = build_strategy(strategy, config.student, config.teacher.shape, config.strategy_options)
    return step_flops(built, config.student, config.teacher.shape, meta["vocab_size"], global_batch, seq_len,
                      masked).total


def scratch_tokens(config: StudyConfig, budget: float, meta: dict, tokens_per_device_second: float | None = None) -> int:
    """T_scratch: tokens `scratch` processes at this budget (SPEC §4), from the same charge the trial uses.

    A device_seconds budget converts through `tokens_per_device_second` (see `calibration`).
    """
    train, seq_len = config.train, meta["seq_len"]
    tokens_per_step = train.per_worker_batch * train.workers * seq_len
    if config.budget_unit == "tokens":
        steps = int(budget // tokens_per_step)
    elif config.budget_unit == "flops":
        steps = int(budget // step_charge(config, meta, "scratch"))
    else:
        if not tokens_per_device_second:
            raise ConfigError("train.tokens_per_device_second", "a device_seconds budget needs a measured or given "
                                                                "rate to size its pool (see raykd.calibration)")
        steps = int(budget * tokens_per_device_second // tokens_per_step)
    return steps * tokens_per_step


def plan_cells(config: StudyConfig, meta: dict, tokens_per_device_second: float | None = None) -> list[Cell]:
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
                    cells.append(Cell(strategy, budget, repetition, seed, unique_examples=unique,
                                      scratch_tokens=tokens))
    return cells


def control_cells(config: StudyConfig) -> list[Cell]:
    """The reference rows of the study, one per control and seed: fine-tuned, never pretrained by the grid."""
    teacher = config.teacher
    budgets = {"random_init": 0.0, "teacher": teacher.budget if teacher.source == "pretrain" else math.nan}
    lrs = {"random_init": math.nan, "teacher": teacher.lr if teacher.source == "pretrain" else math.nan}
    return [Cell(control, budgets[control], math.nan, seed, lr=lrs[control], lr_source="control")
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


def with_tuned_lr(cell: Cell, tuned: dict, source: str | None, default: float) -> Cell:
    """`cell` with its peak LR and where it came from: the tuned one for its (strategy, budget), else `default`."""
    lr = tuned.get(cell.strategy, {}).get(number_key(cell.budget))
    if lr is None:
        return replace(cell, lr=default, lr_source="config:train.lr")
    return replace(cell, lr=float(lr), lr_source=f"tuned:{source}")
