"""The stages before the grid: corpus shards, embedded tasks, the teacher — each cached by config hash.

Every stage writes into the driver's `cache_dir/<stage>-<hash>/` and finishes
by an atomic rename, so an interrupted stage leaves nothing that looks
finished, and a second run (or trial) with the same configuration reuses the
result. Trials never read the driver's cache: `publish_stage` copies a stage
to `<storage>/stages/<stage>-<hash>/` (see `raykd.storage`), and trials get
storage URIs.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from raykd import storage
from raykd.config import ConfigError, StudyConfig
from raykd.data.meta import META_FILE, load_meta
from raykd.data.shards import prepare_corpus

TEACHER_MODEL = "model"
TEACHER_RECORD = "teacher.json"


def config_hash(*parts) -> str:
    """A short stable hash of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAYKD_CACHE", Path.home() / ".cache" / "raykd"))


def data_key(data) -> str:
    """What identifies a prepared corpus: the data fields and the content of every data file
    (size, mtime and SHA-256), so a file rewritten in place is never served from a stale cache."""
    files = []
    for pattern in data.data_files or []:
        for path in sorted(glob.glob(pattern)) or [pattern]:
            stat = os.stat(path)
            files.append((stat.st_size, stat.st_mtime_ns, file_digest(path)))
    fields = asdict(data)
    if data.source != "synthetic":
        del fields["num_words"]  # shapes only the synthetic language: file and hub corpora keep their keys
    return config_hash(fields, files, _generator(data.source))


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def prepare_data(config: StudyConfig, cache_dir: Path, storage_path: str | None = None) -> Path:
    """Tokenizer and Parquet shards of the corpus; returns the meta.json path in the cache.

    A corpus already published to `storage_path` (by an earlier driver, e.g. before the
    head node was replaced) is downloaded rather than built again.
    """
    data = config.data
    out = cache_dir / f"data-{data_key(data)}"
    if storage_path is not None and not (out / META_FILE).exists():
        fetch_stage(out, storage_path)
    source = {"synthetic": "synthetic", "files": "files", "hub": "datasets"}[data.source]
    try:
        return _prepare_corpus(out, source, data)
    except (ValueError, FileNotFoundError) as error:  # a bad file or shard: bad input, named
        raise ConfigError("data", str(error)) from None


def _generator(source: str) -> int | None:
    """The synthetic language's version (part of cache keys: a new language is a new corpus)."""
    from raykd.data.synthetic import LANGUAGE_VERSION

    return LANGUAGE_VERSION if source == "synthetic" else None


def _prepare_corpus(out: Path, source: str, data) -> Path:
    return prepare_corpus(out, source, seed=data.seed, num_documents=data.num_documents,
                          validation_documents=data.validation_documents, num_words=data.num_words, seq_len=data.seq_len,
                          vocab_size=data.vocab_size, tokenizer=data.tokenizer, text_column=data.text_column,
                          data_files=data.data_files, dataset_name=data.dataset_name,
                          dataset_config=data.dataset_config)


def prepare_tasks(config: StudyConfig, cache_dir: Path) -> Path | None:
    """The embedded GLUE-shaped tasks the study evaluates on; None when it uses none."""
    from raykd.data.tasks import TASKS_VERSION, write_tasks
    from raykd.evaluation import TASKS

    embedded = [task for task in config.eval.tasks if TASKS[task].embedded]
    if not embedded:
        return None
    if config.eval.data_dir is not None:
        return Path(config.eval.data_dir)
    evaluation = config.eval
    out = cache_dir / f"tasks-{config_hash(config.data.seed, config.data.num_words, evaluation.train_examples, evaluation.validation_examples, sorted(embedded), _generator('synthetic'), TASKS_VERSION)}"
    if not out.exists():
        staging = _staging(out)
        write_tasks(staging, seed=config.data.seed, train_size=evaluation.train_examples,
                    validation_size=evaluation.validation_examples, tasks=embedded, num_words=config.data.num_words)
        _publish(staging, out)
    return out


def publish_stage(stage_dir: Path, storage_path: str) -> str:
    """The URI of a finished stage folder in the storage, copying it there the first time."""
    return storage.publish(stage_dir, storage.stage_uri(storage_path, Path(stage_dir).name))


def fetch_stage(out: Path, storage_path: str) -> bool:
    """Copy a stage published in the storage into the cache folder `out`; False if none is published."""
    stage = storage.stage_uri(storage_path, out.name)
    if not storage.is_published(stage):
        return False
    staging = _staging(out)
    storage.download(stage, staging)
    (staging / storage.PUBLISHED).unlink()
    _publish(staging, out)
    return True


def publish_data(meta_path: Path, storage_path: str) -> str:
    """The storage URI of the corpus' meta.json (shards and tokenizer beside it)."""
    return storage.join(publish_stage(Path(meta_path).parent, storage_path), META_FILE)


def publish_tasks(tasks_dir: Path | None, storage_path: str) -> str | None:
    """The storage URI of the task files: generated tasks go as their stage, a user's folder by
    `publish_folder` (a URI is taken as is)."""
    if tasks_dir is None or "://" in str(tasks_dir):
        return None if tasks_dir is None else str(tasks_dir)
    if Path(tasks_dir).name.startswith("tasks-"):
        return publish_stage(Path(tasks_dir), storage_path)
    return publish_folder(Path(tasks_dir), "tasks", storage_path)


def publish_folder(folder: Path, stage: str, storage_path: str) -> str:
    """Publish a user's folder as `<stage>-<hash of its path, file names, sizes and mtimes>`."""
    folder = folder.resolve()
    listing = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in folder.rglob("*") if p.is_file())
    return storage.publish(folder, storage.stage_uri(storage_path, f"{stage}-{config_hash(str(folder), listing)}"))


def teacher_key(config: StudyConfig, meta_path: Path) -> str:
    """What identifies a self-pretrained teacher: its shape, budget, LR, the data, the batch and the
    dropout it trained with."""
    teacher = config.teacher
    data_params = load_meta(meta_path)["params"]
    corpus = Path(meta_path).parent.name  # data-<data_key>: the corpus content, not only its parameters
    return config_hash(asdict(teacher.shape), teacher.budget, teacher.budget_unit, teacher.lr, data_params, corpus,
                       config.train.per_worker_batch, config.train.workers, config.data.mask_prob, config.data.seed,
                       config.train.dropout)


def ensure_teacher(config: StudyConfig, meta_path: Path, cache_dir: Path, storage_path: str) -> tuple[str, bool]:
    """Where trials load the teacher from (a storage URI, or the hub name) and whether a cached one was reused.

    source "pretrain": pretrain with `scratch` at the teacher's budget, once per
    configuration hash, as a Ray Train run on the worker nodes reading the corpus
    from the storage; the driver keeps a copy in its cache and publishes it to the
    storage, where later trials and runs find it. Otherwise the source is a local
    path (published to the storage) or a hub name, loaded as an HF masked LM and
    checked against `teacher.shape`.
    """
    teacher = config.teacher
    if teacher.source != "pretrain":
        check_teacher_shape(teacher.source, config)
        if Path(teacher.source).is_dir():  # a folder on the driver's disk: the workers get it from the storage
            return publish_folder(Path(teacher.source), "teacher", storage_path), True
        return teacher.source, True
    out = cache_dir / f"teacher-{teacher_key(config, meta_path)}"
    stage = storage.stage_uri(storage_path, out.name)
    if storage.is_published(stage):
        return storage.join(stage, TEACHER_MODEL), True
    reused = (out / TEACHER_RECORD).exists()
    if not reused:
        summary = pretrain_teacher(config, meta_path, storage_path, name=out.name)
        staging = _staging(out)
        storage.download(summary["checkpoint"], staging / TEACHER_MODEL)
        record = {k: v for k, v in summary.items() if k not in ("curve", "checkpoint")}
        (staging / TEACHER_RECORD).write_text(json.dumps({"config": asdict(teacher), **record}, indent=1))
        _publish(staging, out)
    return storage.join(storage.publish(out, stage), TEACHER_MODEL), reused


def teacher_record(teacher_dir: str) -> dict | None:
    """The pretraining record of a self-pretrained teacher (ledger, MLM validation loss); None for a given one."""
    path = storage.join(str(teacher_dir).rstrip("/").rsplit("/", 1)[0], TEACHER_RECORD)
    return json.loads(storage.read_text(path)) if storage.is_file(path) else None


def pretrain_teacher(config: StudyConfig, meta_path: Path, storage_path: str, name: str) -> dict:
    """Pretrain the teacher with `scratch` on the whole corpus at the teacher's budget."""
    from raykd.plan import Cell
    from raykd.ray_train import Corpus, TrialSpec, run_pretraining

    meta = load_meta(meta_path)
    teacher, train = config.teacher, config.train
    # The teacher's pretraining is a scratch trial of the teacher's shape, budget and LR. It runs at
    # the default precision and uncompiled, whatever `train` says: the teacher's cache key
    # (`teacher_key`) leaves those fields out, so they must not change what a cached teacher is.
    study = replace(config, student=teacher.shape, budget_unit=teacher.budget_unit,
                    train=replace(train, num_threads=teacher.pretrain_threads or train.num_threads, eval_points=1,
                                  precision="auto", compile=False))
    cell = Cell("scratch", teacher.budget, math.nan, config.data.seed,
                unique_examples=meta["splits"]["train"]["num_examples"], lr=teacher.lr)
    spec = TrialSpec(study, cell, Corpus.of(publish_data(meta_path, storage_path), meta))
    return run_pretraining(spec, storage_path, name)


def check_teacher_shape(source: str, config: StudyConfig) -> None:
    """A given teacher must match `teacher.shape`, which the FLOP charge and loss checks rely on."""
    from transformers import AutoConfig

    try:
        loaded = AutoConfig.from_pretrained(source)
    except OSError as error:
        raise ConfigError("teacher.source", f"cannot load {source!r}: {error}") from None
    shape = config.teacher.shape
    found = (loaded.num_hidden_layers, loaded.hidden_size, loaded.num_attention_heads, loaded.intermediate_size)
    expected = (shape.layers, shape.hidden, shape.heads, shape.intermediate)
    if found != expected:
        raise ConfigError("teacher.shape", f"{source} has (layers, hidden, heads, intermediate) = {found}, "
                                           f"the config says {expected}")


def _staging(out: Path) -> Path:
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, out: Path) -> None:
    """Atomically move a finished stage into place (a concurrent finisher wins, ours is dropped)."""
    try:
        os.rename(staging, out)
    except OSError:
        if not out.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
