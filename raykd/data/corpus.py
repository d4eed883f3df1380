"""Corpus sources, all read through one `datasets` code path (SPEC §4).

- "synthetic" (default): the embedded language (raykd.data.synthetic), written
  to local Parquet files first, then read like any local files;
- "files": local text (one document per line), JSONL or Parquet files;
- "datasets": any `datasets` name, e.g. a Wikipedia dump on a cluster.

Every source ends as `datasets.load_dataset(builder_or_name, ...)` and yields a
DatasetDict with "train" and "validation" splits and one column, "text".
Synthetic document ids: train [0, N), validation starting at
VALIDATION_DOCUMENT_OFFSET; the task generators use ids above both
(raykd.data.tasks.TASK_DOCUMENT_OFFSET), so tasks are held out.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterator

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from raykd.data.synthetic import DEFAULT_NUM_WORDS, SyntheticLanguage
from raykd.io import atomic_path

SOURCES = ("synthetic", "files", "datasets")
VALIDATION_DOCUMENT_OFFSET = 10 ** 12
_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_WRITE_BATCH = 1000


def synthetic_texts(seed: int, start: int, count: int, num_words: int = DEFAULT_NUM_WORDS) -> Iterator[str]:
    """Texts of synthetic documents start .. start+count-1 (a lexicon of about num_words word types)."""
    return (doc.text for doc in SyntheticLanguage(seed, num_words).documents(start, count))


def write_synthetic_corpus(out_dir: str | Path, seed: int, num_documents: int,
                           validation_documents: int, num_words: int = DEFAULT_NUM_WORDS) -> dict[str, Path]:
    """Write the synthetic train/validation documents as Parquet files with a
    "text" column; return {split: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, start, count in (("train", 0, num_documents),
                                ("validation", VALIDATION_DOCUMENT_OFFSET, validation_documents)):
        path = out_dir / f"synthetic-{split}.parquet"
        schema = pa.schema([("text", pa.string())])
        with atomic_path(path) as staging, pq.ParquetWriter(staging, schema) as writer:
            texts = synthetic_texts(seed, start, count, num_words)
            for lo in range(0, count, _WRITE_BATCH):
                batch = [next(texts) for _ in range(min(_WRITE_BATCH, count - lo))]
                writer.write_table(pa.table({"text": batch}, schema=schema))
        paths[split] = path
    return paths


def _expand(pattern: str) -> list[str]:
    """Paths matching a file name or glob; a missing file names itself."""
    if any(ch in pattern for ch in "*?["):
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"corpus data_files pattern matches no file: {pattern}")
        return matches
    if not Path(pattern).is_file():
        raise FileNotFoundError(f"corpus data file not found: {pattern}")
    return [pattern]


def resolve_data_files(data_files: str | list[str] | dict[str, str | list[str]]
                       ) -> tuple[str, dict[str, list[str]] | list[str]]:
    """(datasets builder, files) for local files; checks that every file
    exists and that all share one format (.txt, .json/.jsonl or .parquet)."""
    if isinstance(data_files, (str, os.PathLike)):
        data_files = [str(data_files)]
    if isinstance(data_files, dict):
        unknown = set(data_files) - {"train", "validation"}
        if unknown or "train" not in data_files:
            raise ValueError(f"data_files as a dict needs a 'train' key and at most 'validation'; got {sorted(data_files)}")
        files: dict[str, list[str]] | list[str] = {
            split: [m for p in ([v] if isinstance(v, (str, os.PathLike)) else v) for m in _expand(str(p))]
            for split, v in data_files.items()}
        flat = [f for fs in files.values() for f in fs]
    else:
        files = [m for p in data_files for m in _expand(str(p))]
        flat = files
    if not flat:
        raise ValueError("data_files is empty")
    builders = set()
    for f in flat:
        suffix = Path(f).suffix.lower()
        if suffix not in _BUILDERS:
            raise ValueError(f"corpus data file {f} has unsupported extension {suffix!r}; use one of {sorted(_BUILDERS)}")
        builders.add(_BUILDERS[suffix])
    if len(builders) > 1:
        raise ValueError(f"corpus data_files mix formats {sorted(builders)}; use one format")
    return builders.pop(), files


def _text_only(ds: datasets.Dataset, text_column: str, what: str) -> datasets.Dataset:
    if text_column not in ds.column_names:
        raise ValueError(f"text_column {text_column!r} not in {what}; columns: {ds.column_names}")
    ds = ds.select_columns([text_column])
    return ds.rename_column(text_column, "text") if text_column != "text" else ds


def check_source(source: str, *, seed: int, num_documents: int | None, validation_documents: int,
                 num_words: int = DEFAULT_NUM_WORDS,
                 data_files=None, dataset_name: str | None = None) -> None:
    """Refuse a bad corpus specification before any work, naming the field or file."""
    if source not in SOURCES:
        raise ValueError(f"unknown corpus source {source!r}; use one of {SOURCES}")
    if not isinstance(validation_documents, int) or validation_documents < 1:
        raise ValueError(f"validation_documents must be a positive int, got {validation_documents!r}")
    if num_documents is not None and (not isinstance(num_documents, int) or num_documents < 1):
        raise ValueError(f"num_documents must be a positive int, got {num_documents!r}")
    if source == "synthetic":
        if num_documents is None:
            raise ValueError("num_documents is required for the synthetic corpus")
        SyntheticLanguage(seed, num_words)  # validates the seed and the lexicon size
    elif source == "files":
        if data_files is None:
            raise ValueError("data_files is required for corpus source 'files'")
        resolve_data_files(data_files)
    elif not dataset_name:
        raise ValueError("dataset_name is required for corpus source 'datasets'")


def load_corpus(source: str = "synthetic", *, seed: int = 0, num_documents: int | None = None,
                validation_documents: int = 200, num_words: int = DEFAULT_NUM_WORDS, text_column: str = "text",
                data_files: str | list[str] | dict | None = None, dataset_name: str | None = None,
                dataset_config: str | None = None, split: str = "train", work_dir: str | Path | None = None,
                cache_dir: str | Path | None = None) -> datasets.DatasetDict:
    """The corpus as a DatasetDict {"train", "validation"} with a "text" column.

    synthetic: num_documents train documents and validation_documents held-out
    ones (written under work_dir first). files / datasets: if the source has
    no validation split, the last validation_documents rows are held out and
    the train split is the first num_documents of the rest (None = all).
    """
    check_source(source, seed=seed, num_documents=num_documents, validation_documents=validation_documents,
                 num_words=num_words, data_files=data_files, dataset_name=dataset_name)
    cache = None if cache_dir is None else str(cache_dir)
    if source == "synthetic":
        if work_dir is None:
            raise ValueError("work_dir is required for the synthetic corpus (its files are written there)")
        paths = write_synthetic_corpus(work_dir, seed, num_documents, validation_documents, num_words)
        source, data_files, text_column = "files", {k: [str(v)] for k, v in paths.items()}, "text"
    if source == "files":
        builder, files = resolve_data_files(data_files)
        loaded = datasets.load_dataset(builder, data_files=files, cache_dir=cache)
        what = f"data_files {data_files}"
    else:
        loaded = datasets.DatasetDict({"train": datasets.load_dataset(dataset_name, dataset_config, split=split,
                                                                      cache_dir=cache)})
        what = f"dataset {dataset_name}"
    train = _text_only(loaded["train"], text_column, what)
    if "validation" in loaded:
        validation = _text_only(loaded["validation"], text_column, what)
        if num_documents is not None:
            train = train.select(range(min(num_documents, len(train))))
    else:
        if len(train) <= validation_documents:
            raise ValueError(f"{what} has {len(train)} rows; need more than validation_documents={validation_documents}")
        validation = train.select(range(len(train) - validation_documents, len(train)))
        n = len(train) - validation_documents
        train = train.select(range(n if num_documents is None else min(num_documents, n)))
    return datasets.DatasetDict({"train": train, "validation": validation})
