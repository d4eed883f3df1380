"""The one experiment configuration: YAML + command-line overrides, validated once at the door.

A study is described by `StudyConfig`; its keys map one-to-one onto the YAML
presets in raykd/presets/. `load_config(preset, file, overrides)` builds it
and `validate(config)` raises `ConfigError` naming the offending field before
any compute is spent. Deeper code takes the few fields it uses.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from raykd.budget import UNITS
from raykd.strategies import STRATEGIES  # the registry's names; no strategy module (torch) is imported for them
from raykd.task_specs import TASKS

# Nothing here imports torch, transformers or Ray (they take 5-20 s to import):
# the entry scripts validate everything they can before importing them.
PRESETS_DIR = Path(__file__).parent / "presets"
PRESETS = ("smoke", "local", "paper")
PLACEMENTS = ("actor", "colocated")
DATA_SOURCES = ("synthetic", "files", "hub")
DTYPES = ("float32", "bfloat16", "float16")
# Reference rows fine-tuned beside the strategies (SPEC §6): the never-pretrained student and the teacher.
CONTROLS = ("random_init", "teacher")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # raykd.device applies them (it imports torch)
CALIBRATION_WARMUP_STEPS = 5  # steps of the calibration run left out of the measured rate (allocator, kernels, compile)


class ConfigError(ValueError):
    """Bad input; the message starts with the dotted name of the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class ModelShape:
    """Size of a BERT encoder: layers, hidden width, attention heads, FFN width (the student's, the teacher's)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int


@dataclass
class TeacherConfig:
    source: str = "pretrain"  # "pretrain" (raykd trains it with `scratch`), a local path, or a hub name
    shape: ModelShape = field(default_factory=lambda: ModelShape(4, 256, 4, 1024))
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
class DataConfig:
    source: str = "synthetic"  # synthetic | files | hub
    data_files: list[str] | None = None
    dataset_name: str | None = None
    dataset_config: str | None = None
    text_column: str = "text"
    num_documents: int = 4000
    validation_documents: int = 200
    num_words: int = 3000  # synthetic only: the lexicon's size in word types
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
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))
    student: ModelShape = field(default_factory=lambda: ModelShape(2, 128, 4, 512))
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # Options of the strategies' losses by name (temperature, alpha, relation_heads, ...); each strategy
    # reads the ones its module declares (raykd/strategies/), with its own defaults for the rest.
    strategy_options: dict[str, typing.Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(preset: str = "local", file: str | Path | None = None, overrides: list[str] = (),
                strategy_checks: bool = True) -> StudyConfig:
    """Preset YAML, then an optional YAML file, then `a.b=value` overrides; validated.

    strategy_checks=False leaves out the strategies' own checks (`check_strategy_pairs`), which import
    torch: the entry scripts run them after every cheaper check of their arguments.
    """
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
            raise ConfigError("config", f"{path} is not valid YAML: {_yaml_problem(error)}") from None
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
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(key, f"cannot read {value!r}: {_yaml_problem(error)}") from None
    config = from_dict(StudyConfig, raw)
    validate(config)
    if strategy_checks:
        check_strategy_pairs(config)
    return config


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line (PyYAML's own message spans several)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


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
            number = float(value)  # YAML reads "1e-3" as a string
            if not math.isfinite(number):
                raise ConfigError(name, f"must be a finite number, got {value!r}")
            return number
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(float(value)) if isinstance(value, str) else int(value)
        if hint is str:
            if not isinstance(value, str):
                raise TypeError
            return value
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(name, f"expected {hint.__name__}, got {value!r}") from None
    return value


def validate(config: StudyConfig) -> None:
    """Raise ConfigError naming the first bad field; nothing has been computed, nothing heavy imported."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", config.name):
        raise ConfigError("name", f"must be letters, digits, '_', '.' or '-' (it names folders), got {config.name!r}")
    for unit_field, unit in (("budget_unit", config.budget_unit), ("teacher.budget_unit", config.teacher.budget_unit)):
        if unit not in UNITS:
            raise ConfigError(unit_field, f"unknown budget unit {unit!r}; known: {', '.join(UNITS)}")
    _check_axis("budgets", config.budgets, "positive", lambda v: v > 0)
    _check_axis("repetitions", config.repetitions, ">= 1", lambda v: v >= 1)
    _check_axis("seeds", config.seeds, f"in [0, {SEED_LIMIT})", lambda v: 0 <= v < SEED_LIMIT)
    if config.unique_tokens is not None and config.unique_tokens < config.data.seq_len:
        raise ConfigError("unique_tokens", f"must hold at least one sequence ({config.data.seq_len} tokens)")
    _check_shape("student", config.student, config.data.seq_len)
    _check_shape("teacher.shape", config.teacher.shape, config.data.seq_len)
    _check_axis("strategies", config.strategies, "a known strategy", lambda name: name in STRATEGIES,
                known=STRATEGIES)
    if config.controls:  # none is allowed: a study without reference rows (e.g. a cluster test)
        _check_axis("controls", config.controls, "a known control", lambda name: name in CONTROLS, known=CONTROLS)
    if not isinstance(config.strategy_options, dict):
        raise ConfigError("strategy_options", "must be a mapping of option names to values")
    _check_teacher(config)
    _check_data(config.data)
    _check_train(config)
    if config.train.precision not in PRECISIONS:
        raise ConfigError("train.precision", f"unknown precision {config.train.precision!r}; known: {', '.join(PRECISIONS)}")
    if not isinstance(config.train.compile, bool):
        raise ConfigError("train.compile", f"must be true or false, got {config.train.compile!r}")
    if config.train.calibration_steps < CALIBRATION_WARMUP_STEPS + 2:
        raise ConfigError("train.calibration_steps", f"must be >= {CALIBRATION_WARMUP_STEPS + 2} (the first "
                                                     f"{CALIBRATION_WARMUP_STEPS} are warm-up), got {config.train.calibration_steps}")
    _check_budgets_pay_for_a_step(config)
    _check_eval(config.eval)
    tune = config.tune
    if tune.trials < 1:
        raise ConfigError("tune.trials", f"must be >= 1, got {tune.trials}")
    if not 0 < tune.lr_min < tune.lr_max:
        raise ConfigError("tune.lr_min", f"needs 0 < lr_min < lr_max, got {tune.lr_min} and {tune.lr_max}")
    if not 0 < tune.budget_fraction <= 1:
        raise ConfigError("tune.budget_fraction", f"must be in (0, 1], got {tune.budget_fraction}")
    if not 1 <= tune.grace_points <= config.train.eval_points:
        raise ConfigError("tune.grace_points", f"must be in 1..train.eval_points ({config.train.eval_points}), "
                                               f"got {tune.grace_points}")
    sweep = config.sweep
    if sweep.ray_cpus is not None and sweep.ray_cpus < 1:
        raise ConfigError("sweep.ray_cpus", f"must be >= 1 (or null: the machine's), got {sweep.ray_cpus}")
    if not sweep.trial_cpus > 0:
        raise ConfigError("sweep.trial_cpus", f"must be positive (Tune refuses 0), got {sweep.trial_cpus}")
    if sweep.max_concurrent_trials is not None and sweep.max_concurrent_trials < 1:
        raise ConfigError("sweep.max_concurrent_trials", f"must be >= 1 (or null: no limit), "
                                                         f"got {sweep.max_concurrent_trials}")


SEED_LIMIT = 2 ** 32  # numpy and the synthetic language take 32-bit seeds

def check_strategy_pairs(config: StudyConfig) -> None:
    """Each strategy's options and its own checks of the student/teacher pair (raykd/strategies/<name>.py).

    Apart from `validate` because it imports the strategy modules, and with them torch and
    transformers (2-3 s): the entry scripts refuse every other bad input before that.
    """
    from raykd.strategies import check_options, check_pair

    try:
        check_options(config.strategies, config.strategy_options)
        for name in config.strategies:
            check_pair(name, config.student, config.teacher.shape,
                       config.strategy_options)
    except ValueError as error:
        field_name, _, message = str(error).partition(": ")
        raise ConfigError(field_name, message) from None


def _check_axis(name: str, values: list, rule: str, ok, known: tuple = ()) -> None:
    """A grid axis: non-empty, every value obeying `rule`, no value twice (two cells would collide)."""
    if not values:
        raise ConfigError(name, "needs at least one value")
    for value in values:
        if not ok(value):
            listing = f"; known: {', '.join(known)}" if known else ""
            raise ConfigError(name, f"every value must be {rule}, got {value!r}{listing}")
    repeated = sorted({repr(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(name, f"{', '.join(repeated)} given more than once")


def _check_shape(name: str, shape: ModelShape, seq_len: int) -> None:
    for key in ("layers", "hidden", "heads", "intermediate"):
        if getattr(shape, key) < 1:
            raise ConfigError(f"{name}.{key}", f"must be >= 1, got {getattr(shape, key)}")
    if shape.hidden % shape.heads:
        raise ConfigError(f"{name}.heads", f"{shape.heads} heads do not divide the width {shape.hidden}")


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or os.path.exists(source)


def _check_teacher(config: StudyConfig) -> None:
    """The teacher's own fields; a teacher given as a local folder must fit the student's corpus."""
    teacher = config.teacher
    if teacher.source == "pretrain":
        if not teacher.budget > 0:
            raise ConfigError("teacher.budget", f"must be positive, got {teacher.budget}")
        if not teacher.lr > 0:
            raise ConfigError("teacher.lr", f"must be positive, got {teacher.lr}")
    elif _looks_like_path(teacher.source):
        _check_teacher_folder(Path(teacher.source).expanduser(), config)
    if teacher.placement not in PLACEMENTS:
        raise ConfigError("teacher.placement", f"unknown placement {teacher.placement!r}; known: {', '.join(PLACEMENTS)}")
    if teacher.dtype not in DTYPES:
        raise ConfigError("teacher.dtype", f"unknown dtype {teacher.dtype!r}; known: {', '.join(DTYPES)}")
    if teacher.actors < 1:
        raise ConfigError("teacher.actors", f"must be >= 1, got {teacher.actors}")
    if not teacher.actor_cpus > 0:
        raise ConfigError("teacher.actor_cpus", f"must be positive, got {teacher.actor_cpus}")
    if teacher.actor_gpus < 0:
        raise ConfigError("teacher.actor_gpus", f"must be >= 0, got {teacher.actor_gpus}")
    if teacher.pretrain_threads is not None and teacher.pretrain_threads < 1:
        raise ConfigError("teacher.pretrain_threads", f"must be >= 1, got {teacher.pretrain_threads}")


def _check_teacher_folder(folder: Path, config: StudyConfig) -> None:
    """An HF teacher folder, read from its config.json: its shape, vocabulary and positions."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError("teacher.source", f"{folder} is not an HF model folder (no config.json)")
    try:
        loaded = json.loads(config_file.read_text())
        found = tuple(int(loaded[key]) for key in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                   "intermediate_size", "vocab_size", "max_position_embeddings"))
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError("teacher.source", f"{config_file} is not a BERT-style config: {error!r}") from None
    shape = config.teacher.shape
    expected = (shape.layers, shape.hidden, shape.heads, shape.intermediate)
    if found[:4] != expected:
        raise ConfigError("teacher.shape", f"{folder} has (layers, hidden, heads, intermediate) = {found[:4]}, "
                                           f"the config says {expected}")
    vocab, positions = found[4:]
    if config.data.tokenizer is None and vocab < config.data.vocab_size:
        raise ConfigError("data.vocab_size", f"{config.data.vocab_size} token ids do not fit the teacher {folder}, "
                                             f"whose vocabulary has {vocab}")
    if positions < config.data.seq_len:
        raise ConfigError("data.seq_len", f"{config.data.seq_len} positions do not fit the teacher {folder}, "
                                          f"which has {positions} (max_position_embeddings)")


def _check_data(data: DataConfig) -> None:
    if data.source not in DATA_SOURCES:
        raise ConfigError("data.source", f"unknown source {data.source!r}; known: {', '.join(DATA_SOURCES)}")
    if data.source == "files":
        if not data.data_files:
            raise ConfigError("data.data_files", "source 'files' needs at least one file")
        for path in data.data_files:
            check_data_file(Path(path), data.text_column)
    if data.source == "hub":
        if not data.dataset_name:
            raise ConfigError("data.dataset_name", "source 'hub' needs a datasets name")
    if data.tokenizer is not None and _looks_like_path(data.tokenizer) and not Path(data.tokenizer).expanduser().is_dir():
        raise ConfigError("data.tokenizer", f"folder not found: {data.tokenizer}")
    if not data.text_column:
        raise ConfigError("data.text_column", "must name a column")
    for name in ("num_documents", "validation_documents"):
        if getattr(data, name) < 1:
            raise ConfigError(f"data.{name}", f"must be >= 1, got {getattr(data, name)}")
    if data.num_words < 300:
        raise ConfigError("data.num_words", f"must be at least 300 (the tasks draw distinct words of each kind), "
                                            f"got {data.num_words}")
    if data.seq_len < 8:
        raise ConfigError("data.seq_len", f"must be at least 8, got {data.seq_len}")
    if data.vocab_size < 64:
        raise ConfigError("data.vocab_size", f"must be at least 64 (special tokens and characters), got {data.vocab_size}")
    if not 0 <= data.seed < SEED_LIMIT:
        raise ConfigError("data.seed", f"must be in [0, {SEED_LIMIT}), got {data.seed}")
    if not 0 < data.mask_prob < 1:
        raise ConfigError("data.mask_prob", f"must be in (0, 1), got {data.mask_prob}")


PARQUET_MAGIC = b"PAR1"


def check_data_file(path: Path, text_column: str) -> None:
    """A corpus file that exists, is not empty, and is what its extension says (named if not)."""
    field_name = "data.data_files"
    if any(ch in str(path) for ch in "*?["):
        import glob

        if not glob.glob(str(path)):
            raise ConfigError(field_name, f"pattern matches no file: {path}")
        return
    if not path.is_file():
        raise ConfigError(field_name, f"file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".text", ".json", ".jsonl", ".parquet"):
        raise ConfigError(field_name, f"{path}: unsupported extension {suffix!r}; use .txt, .json, .jsonl or .parquet")
    if suffix == ".parquet":
        with open(path, "rb") as stream:
            head = stream.read(4)
            stream.seek(max(0, path.stat().st_size - 4))
            tail = stream.read(4)
        if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
            raise ConfigError(field_name, f"{path} is not a Parquet file")
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as error:  # pyarrow raises several types for a damaged footer
            raise ConfigError(field_name, f"{path} is a damaged Parquet file: {error}") from None
        if text_column not in schema.names:
            raise ConfigError("data.text_column", f"{text_column!r} is not a column of {path}; "
                                                  f"columns: {', '.join(schema.names)}")
        return
    with open(path, "rb") as stream:
        first = next((line for line in stream if line.strip()), None)
    if first is None:
        raise ConfigError(field_name, f"{path} is empty (no non-blank line)")
    if suffix in (".json", ".jsonl"):
        try:
            record = json.loads(first)
        except ValueError as error:
            raise ConfigError(field_name, f"{path}: first record is not JSON: {error}") from None
        if not isinstance(record, dict) or text_column not in record:
            raise ConfigError("data.text_column", f"{text_column!r} is not a field of the first record of {path}")


def check_reachable(config: StudyConfig) -> None:
    """What lies outside this machine's files: a hub dataset must resolve (from a local folder,
    the `datasets` cache, or the hub) before anything runs. Separate from `validate`, which
    never leaves the machine: a preset naming a hub dataset stays loadable offline."""
    if config.data.source != "hub":
        return
    import datasets

    name, config_name = config.data.dataset_name, config.data.dataset_config

    datasets.logging.disable_progress_bar()
    try:
        datasets.load_dataset_builder(name, config_name)
    except Exception as error:  # datasets raises ConnectionError, FileNotFoundError, ValueError ...
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError("data.dataset_name", f"cannot load {name!r}: {message}") from None


def _check_train(config: StudyConfig) -> None:
    train = config.train
    for name in ("per_worker_batch", "workers", "num_threads", "checkpoint_every", "eval_points", "validation_examples"):
        if getattr(train, name) < 1:
            raise ConfigError(f"train.{name}", f"must be >= 1, got {getattr(train, name)}")
    if not train.lr > 0:
        raise ConfigError("train.lr", f"must be positive, got {train.lr}")
    if len(train.betas) != 2 or not all(0 <= beta < 1 for beta in train.betas):
        raise ConfigError("train.betas", f"needs two values in [0, 1), got {train.betas}")
    if not train.eps > 0:
        raise ConfigError("train.eps", f"must be positive, got {train.eps}")
    if train.weight_decay < 0:
        raise ConfigError("train.weight_decay", f"must be >= 0, got {train.weight_decay}")
    if train.max_grad_norm < 0:
        raise ConfigError("train.max_grad_norm", f"must be >= 0 (0: no clipping), got {train.max_grad_norm}")
    if not 0 <= train.dropout < 1:
        raise ConfigError("train.dropout", f"must be in [0, 1), got {train.dropout}")
    if not train.cpus_per_worker > 0:
        raise ConfigError("train.cpus_per_worker", f"must be positive, got {train.cpus_per_worker}")
    if train.gpus_per_worker < 0:
        raise ConfigError("train.gpus_per_worker", f"must be >= 0, got {train.gpus_per_worker}")
    if train.tokens_per_device_second is not None and not train.tokens_per_device_second > 0:
        raise ConfigError("train.tokens_per_device_second", f"must be positive, got {train.tokens_per_device_second}")
    if train.lr_file is not None and not Path(train.lr_file).is_file():
        raise ConfigError("train.lr_file", f"file not found: {train.lr_file}")


def _check_budgets_pay_for_a_step(config: StudyConfig) -> None:
    """Refuse a budget below one step before the corpus is built.

    The exact charge needs the corpus (its vocabulary); this uses a lower bound
    that holds for every strategy: the student encoder's matmuls, forward and
    backward. raykd.plan.plan_cells checks the exact charge afterwards.
    """
    train, shape = config.train, config.student
    tokens = train.per_worker_batch * train.workers * config.data.seq_len
    least = {"tokens": float(tokens),
             "flops": 3.0 * tokens * 2 * shape.layers * (4 * shape.hidden ** 2 + 2 * shape.hidden * shape.intermediate)
             }.get(config.budget_unit)
    if least is None:
        return
    for budget in config.budgets:
        if budget < least:
            raise ConfigError("budgets", f"{budget!r} {config.budget_unit} does not pay for one training step "
                                         f"(at least {least:.6g})")


def _check_eval(evaluation: EvalConfig) -> None:
    _check_axis("eval.tasks", evaluation.tasks, "a known task", lambda task: task in TASKS, known=tuple(sorted(TASKS)))
    if evaluation.data_dir is not None and not Path(evaluation.data_dir).is_dir():
        raise ConfigError("eval.data_dir", f"folder not found: {evaluation.data_dir}")
    if not evaluation.learning_rates or any(not lr > 0 for lr in evaluation.learning_rates):
        raise ConfigError("eval.learning_rates", "needs positive learning rates")
    if not evaluation.batch_sizes or any(b < 1 for b in evaluation.batch_sizes):
        raise ConfigError("eval.batch_sizes", "needs batch sizes >= 1")
    for name in ("epochs", "train_examples", "validation_examples"):
        if getattr(evaluation, name) < 1:
            raise ConfigError(f"eval.{name}", f"must be >= 1, got {getattr(evaluation, name)}")
    if evaluation.max_seq_len < 8:
        raise ConfigError("eval.max_seq_len", f"must be at least 8, got {evaluation.max_seq_len}")


def add_study_arguments(parser, default_preset: str = "local", out_help: str | None = None) -> None:
    """The arguments the entry scripts share: --preset, --config, --cache-dir and `field=value`
    overrides; with `out_help`, also --out (default: runs/<preset>) and --storage."""
    parser.add_argument("--preset", default=default_preset, choices=PRESETS)
    parser.add_argument("--config", help="YAML file overriding the preset")
    if out_help is not None:
        parser.add_argument("--out", help=out_help)
        parser.add_argument("--storage", help="what every node reads and writes (corpus, tasks, teacher, checkpoints, "
                                              "rows): a shared path or s3://..., gs://... (default: OUT/ray)")
    parser.add_argument("--cache-dir", help="where corpus, tasks and teachers are cached "
                                            "(default: $RAYKD_CACHE or ~/.cache/raykd)")
    parser.add_argument("overrides", nargs="*", metavar="field=value", help="config overrides, e.g. train.lr=5e-4")


def load_arguments(args, overrides: list[str] | None = None) -> tuple[StudyConfig, Path | None]:
    """The configuration and output folder that `add_study_arguments`' arguments name, after every
    check that needs no corpus and no torch (the strategies' own checks are left to the caller).
    `overrides` replaces `args.overrides` (a script that adds its own)."""
    config = load_config(args.preset, args.config, args.overrides if overrides is None else overrides,
                         strategy_checks=False)
    out = Path(args.out or f"runs/{args.preset}").resolve() if hasattr(args, "out") else None
    check_locations(out=out, storage=getattr(args, "storage", None), cache_dir=args.cache_dir)
    check_reachable(config)
    return config, out


STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "file")


def check_locations(out: Path | None = None, storage: str | None = None, cache_dir: str | None = None) -> None:
    """The entry scripts' folders and storage URI, checked before anything is built or started."""
    if out is not None:
        _check_writable_folder("--out", out)
    if storage is not None:
        scheme, sep, rest = storage.partition("://")
        if sep and scheme not in STORAGE_SCHEMES:
            raise ConfigError("--storage", f"unknown scheme {scheme + '://'!r} in {storage!r}; use a local path or "
                                           f"one of {', '.join(s + '://' for s in STORAGE_SCHEMES)}")
        if sep and not rest.strip("/"):
            raise ConfigError("--storage", f"{storage!r} names no bucket or folder")
        if not sep or scheme == "file":
            _check_writable_folder("--storage", Path(rest if sep else storage))
    if cache_dir is not None:
        _check_writable_folder("--cache-dir", Path(cache_dir))


def _check_writable_folder(name: str, path: Path) -> None:
    """`path` is a folder, or can be created as one, and can be written."""
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(name, f"{path} exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(name, f"cannot create {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(name, f"cannot write to {existing}")
