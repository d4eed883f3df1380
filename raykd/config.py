"""The one experiment configuration: YAML + command-line overrides, validated once at the door.

A study is described by `StudyConfig`; its keys map one-to-one onto the YAML
presets in raykd/presets/. `load_config(preset, file, overrides)` builds it
and `validate(config)` raises `ConfigError` naming the offending field before
any compute is spent. Deeper code takes the few fields it uses.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from raykd.budget import UNITS
from raykd.device import PRECISIONS
from raykd.models import ModelShape
from raykd.strategies import STRATEGIES, StrategyOptions, check_pair

PRESETS_DIR = Path(__file__).parent / "presets"
PRESETS = ("smoke", "local", "paper")
PLACEMENTS = ("actor", "colocated")
DATA_SOURCES = ("synthetic", "files", "hub")
DTYPES = ("float32", "bfloat16", "float16")
CALIBRATION_WARMUP_STEPS = 5  # steps of the calibration run left out of the measured rate (allocator, kernels, compile)


class ConfigError(ValueError):
    """Bad input; the message starts with the dotted name of the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class Shape:
    layers: int
    hidden: int
    heads: int
    intermediate: int

    def model_shape(self) -> ModelShape:
        return ModelShape(self.layers, self.hidden, self.heads, self.intermediate)


@dataclass
class TeacherConfig:
    source: str = "pretrain"  # "pretrain" (raykd trains it with `scratch`), a local path, or a hub name
    shape: Shape = field(default_factory=lambda: Shape(4, 256, 4, 1024))
    budget: float = 2.0e13  # its own pretraining budget, when source is "pretrain"
    budget_unit: str = "flops"
    lr: float = 1.0e-3
    pretrain_threads: int | None = None  # torch threads of its own pretraining, which runs alone (None: train.num_threads)
    placement: str = "actor"  # "actor": Ray inference actors; "colocated": inside each training worker
    actors: int = 1
    actor_cpus: float = 1.0
    actor_gpus: float = 0.0
    dtype: str = "float32"  # dtype of what the teacher sends back


@dataclass
class StrategyConfig:
    temperature: float = 1.0
    alpha: float = 0.5
    layer_map: list[int] | None = None
    relation_heads: int = 4
    teacher_layer: int | None = None

    def options(self) -> StrategyOptions:
        return StrategyOptions(self.temperature, self.alpha,
                               tuple(self.layer_map) if self.layer_map else None,
                               self.relation_heads, self.teacher_layer)


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | files | hub
    data_files: list[str] | None = None
    dataset_name: str | None = None
    dataset_config: str | None = None
    text_column: str = "text"
    num_documents: int = 4000
    validation_documents: int = 200
    seq_len: int = 128
    vocab_size: int = 4096
    tokenizer: str | None = None  # None: train a WordPiece on the corpus
    seed: int = 0
    mask_prob: float = 0.15


@dataclass
class TrainConfig:
    lr: float = 1.0e-3  # peak LR when no tuned value exists for a (strategy, budget)
    lr_file: str | None = None  # written by sweeps/tune_lr.py; default: <out>/tuned_lr.json
    per_worker_batch: int = 32
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    num_threads: int = 1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1.0e-6
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    dropout: float = 0.1
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16: student, teacher forward, fine-tuning
    compile: bool = False  # torch.compile the training step (pays a compile time per trial)
    # device_seconds budgets size the data pool (SPEC §4) from scratch tokens per device-second,
    # measured before the grid by a `calibration_steps` scratch run on the trials' hardware;
    # a value here overrides the measurement.
    tokens_per_device_second: float | None = None
    calibration_steps: int = 30
    checkpoint_every: int = 50
    eval_points: int = 4  # MLM validation points along the budget
    validation_examples: int = 256


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["syn_cola", "syn_topic", "syn_para", "syn_nli", "syn_sts"])
    data_dir: str | None = None  # None: the embedded tasks (for syn_*) or the hub (GLUE names)
    learning_rates: list[float] = field(default_factory=lambda: [1e-4, 3e-4])
    batch_sizes: list[int] = field(default_factory=lambda: [32])
    epochs: int = 3
    max_seq_len: int = 64
    train_examples: int = 2000  # embedded tasks: generated size; any task: cap on examples used
    validation_examples: int = 500


@dataclass
class TuneConfig:
    trials: int = 6
    lr_min: float = 1.0e-4
    lr_max: float = 3.0e-3
    budget_fraction: float = 1.0  # of each budget used per tuning trial
    grace_points: int = 1  # ASHA grace period, in MLM validation points


@dataclass
class SweepConfig:
    ray_cpus: int | None = None  # logical CPUs of a local Ray (None: the machine's); ignored on a cluster
    trial_cpus: float = 0.5  # the Tune trial process (it runs the GLUE fine-tuning)
    max_concurrent_trials: int | None = None


@dataclass
class StudyConfig:
    name: str = "local"
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    budget_unit: str = "flops"
    budgets: list[float] = field(default_factory=lambda: [2.0e12])
    repetitions: list[float] = field(default_factory=lambda: [1.0])
    unique_tokens: int | None = None  # a pool size given directly, instead of repetition
    seeds: list[int] = field(default_factory=lambda: [0])
    student: Shape = field(default_factory=lambda: Shape(2, 128, 4, 512))
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    strategy_options: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(preset: str = "local", file: str | Path | None = None, overrides: list[str] = ()) -> StudyConfig:
    """Preset YAML, then an optional YAML file, then `a.b=value` overrides; validated."""
    if preset not in PRESETS:
        raise ConfigError("preset", f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    raw = yaml.safe_load((PRESETS_DIR / f"{preset}.yaml").read_text()) or {}
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError("config", f"file not found: {path}")
        try:
            extra = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError("config", f"{path} is not valid YAML: {error}") from None
        if not isinstance(extra, dict):
            raise ConfigError("config", f"{path} must hold a mapping of fields")
        _merge(raw, extra)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(key, f"override {item!r} must look like field=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "is not a group of fields")
        node[parts[-1]] = yaml.safe_load(value)
    config = from_dict(StudyConfig, raw)
    validate(config)
    return config


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def from_dict(cls, raw: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown fields and wrong types by name."""
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "config", "must be a mapping of fields")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}{key}", f"unknown field; known: {', '.join(sorted(known))}")
    values = {}
    for key, value in raw.items():
        values[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**values)


def _coerce(hint, value, name: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{name}.")
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(args[0], item, name) for item in items]
    try:
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)  # YAML reads "1e-3" as a string
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(float(value)) if isinstance(value, str) else int(value)
        if hint is str:
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        raise ConfigError(name, f"expected {hint.__name__}, got {value!r}") from None
    return value


def validate(config: StudyConfig) -> None:
    """Raise ConfigError naming the first bad field; nothing has been computed yet."""
    if not config.strategies:
        raise ConfigError("strategies", "at least one strategy is needed")
    for name in config.strategies:
        if name not in STRATEGIES:
            raise ConfigError("strategies", f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    for unit_field, unit in (("budget_unit", config.budget_unit), ("teacher.budget_unit", config.teacher.budget_unit)):
        if unit not in UNITS:
            raise ConfigError(unit_field, f"unknown budget unit {unit!r}; known: {', '.join(UNITS)}")
    if not config.budgets:
        raise ConfigError("budgets", "at least one budget is needed")
    for budget in config.budgets:
        if not budget > 0:
            raise ConfigError("budgets", f"every budget must be positive, got {budget}")
    if not config.repetitions:
        raise ConfigError("repetitions", "at least one repetition is needed")
    for repetition in config.repetitions:
        if not repetition >= 1:
            raise ConfigError("repetitions", f"every repetition must be >= 1, got {repetition}")
    if config.unique_tokens is not None and config.unique_tokens < config.data.seq_len:
        raise ConfigError("unique_tokens", f"must hold at least one sequence ({config.data.seq_len} tokens)")
    if not config.seeds:
        raise ConfigError("seeds", "at least one seed is needed")
    _check_shape("student", config.student, config.data.seq_len)
    _check_shape("teacher.shape", config.teacher.shape, config.data.seq_len)
    teacher = config.teacher
    if teacher.source == "pretrain" and not teacher.budget > 0:
        raise ConfigError("teacher.budget", f"must be positive, got {teacher.budget}")
    if teacher.placement not in PLACEMENTS:
        raise ConfigError("teacher.placement", f"unknown placement {teacher.placement!r}; known: {', '.join(PLACEMENTS)}")
    if teacher.dtype not in DTYPES:
        raise ConfigError("teacher.dtype", f"unknown dtype {teacher.dtype!r}; known: {', '.join(DTYPES)}")
    if teacher.actors < 1:
        raise ConfigError("teacher.actors", f"must be >= 1, got {teacher.actors}")
    if teacher.pretrain_threads is not None and teacher.pretrain_threads < 1:
        raise ConfigError("teacher.pretrain_threads", f"must be >= 1, got {teacher.pretrain_threads}")
    options = config.strategy_options
    if not options.temperature > 0:
        raise ConfigError("strategy_options.temperature", f"must be positive, got {options.temperature}")
    if not 0 <= options.alpha <= 1:
        raise ConfigError("strategy_options.alpha", f"must be in [0, 1], got {options.alpha}")
    for name in config.strategies:
        try:
            check_pair(name, config.student.model_shape(), teacher.shape.model_shape(), options.options())
        except ValueError as error:
            field_name, _, message = str(error).partition(": ")
            raise ConfigError(field_name, message) from None
    data = config.data
    if data.source not in DATA_SOURCES:
        raise ConfigError("data.source", f"unknown source {data.source!r}; known: {', '.join(DATA_SOURCES)}")
    if data.source == "files":
        if not data.data_files:
            raise ConfigError("data.data_files", "source 'files' needs at least one file")
        for path in data.data_files:
            if not Path(path).is_file():
                raise ConfigError("data.data_files", f"file not found: {path}")
    if data.source == "hub" and not data.dataset_name:
        raise ConfigError("data.dataset_name", "source 'hub' needs a datasets name")
    if data.seq_len < 8:
        raise ConfigError("data.seq_len", f"must be at least 8, got {data.seq_len}")
    if not 0 < data.mask_prob < 1:
        raise ConfigError("data.mask_prob", f"must be in (0, 1), got {data.mask_prob}")
    for name in ("per_worker_batch", "workers", "num_threads", "checkpoint_every", "eval_points", "validation_examples"):
        if getattr(config.train, name) < 1:
            raise ConfigError(f"train.{name}", f"must be >= 1, got {getattr(config.train, name)}")
    if config.train.precision not in PRECISIONS:
        raise ConfigError("train.precision", f"unknown precision {config.train.precision!r}; known: {', '.join(PRECISIONS)}")
    if not isinstance(config.train.compile, bool):
        raise ConfigError("train.compile", f"must be true or false, got {config.train.compile!r}")
    if config.train.tokens_per_device_second is not None and not config.train.tokens_per_device_second > 0:
        raise ConfigError("train.tokens_per_device_second", f"must be positive, got {config.train.tokens_per_device_second}")
    if config.train.calibration_steps < CALIBRATION_WARMUP_STEPS + 2:
        raise ConfigError("train.calibration_steps", f"must be >= {CALIBRATION_WARMUP_STEPS + 2} (the first "
                                                     f"{CALIBRATION_WARMUP_STEPS} are warm-up), got {config.train.calibration_steps}")
    if not config.sweep.trial_cpus > 0:
        raise ConfigError("sweep.trial_cpus", f"must be positive (Tune refuses 0), got {config.sweep.trial_cpus}")
    if not config.train.lr > 0:
        raise ConfigError("train.lr", f"must be positive, got {config.train.lr}")
    if config.train.lr_file is not None and not Path(config.train.lr_file).is_file():
        raise ConfigError("train.lr_file", f"file not found: {config.train.lr_file}")
    _check_eval(config.eval)
    if config.tune.trials < 1:
        raise ConfigError("tune.trials", f"must be >= 1, got {config.tune.trials}")
    if not 0 < config.tune.lr_min < config.tune.lr_max:
        raise ConfigError("tune.lr_min", "needs 0 < lr_min < lr_max")


def _check_shape(name: str, shape: Shape, seq_len: int) -> None:
    for key in ("layers", "hidden", "heads", "intermediate"):
        if getattr(shape, key) < 1:
            raise ConfigError(f"{name}.{key}", f"must be >= 1, got {getattr(shape, key)}")
    if shape.hidden % shape.heads:
        raise ConfigError(f"{name}.heads", f"{shape.heads} heads do not divide the width {shape.hidden}")


def _check_eval(evaluation: EvalConfig) -> None:
    from raykd.evaluation import TASKS  # the task registry

    for task in evaluation.tasks:
        if task not in TASKS:
            raise ConfigError("eval.tasks", f"unknown task {task!r}; known: {', '.join(sorted(TASKS))}")
    if evaluation.data_dir is not None and not Path(evaluation.data_dir).is_dir():
        raise ConfigError("eval.data_dir", f"folder not found: {evaluation.data_dir}")
    if not evaluation.learning_rates or any(not lr > 0 for lr in evaluation.learning_rates):
        raise ConfigError("eval.learning_rates", "needs positive learning rates")
    if not evaluation.batch_sizes or any(b < 1 for b in evaluation.batch_sizes):
        raise ConfigError("eval.batch_sizes", "needs batch sizes >= 1")
    if evaluation.epochs < 1:
        raise ConfigError("eval.epochs", f"must be >= 1, got {evaluation.epochs}")
