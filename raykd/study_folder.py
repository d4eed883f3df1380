"""The study folder (`--out`): bound to one configuration, held by one driver, rows written durably.

Plain files, no torch and no Ray, so the entry scripts check a folder before
anything heavy is imported:
- `check_binding` refuses `--resume` with a configuration other than the one
  recorded in `study.json`, naming the fields that differ;
- `hold` takes an exclusive `fcntl` lock on `.driver.lock` for as long as a
  driver runs; the kernel drops it when the process dies, so a killed driver
  never leaves the folder stuck;
- `write_row` writes a trial's row atomically and fsyncs the file and its folder;
- `finished_rows` reads the rows, setting aside (and naming) any that are damaged,
  so their cells run again under `--resume`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from raykd.config import ConfigError, StudyConfig
from raykd.io import atomic_write_text, fsync_folder

TRIALS_DIR = "trials"
DAMAGED_DIR = "damaged"
STUDY_FILE = "study.json"
LOCK_FILE = ".driver.lock"
# Fields that decide where and how wide trials are scheduled, never what they compute.
UNBOUND_PREFIXES = ("sweep.",)

_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth


def flatten(values: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def bound_fields(config: StudyConfig) -> dict:
    """The dotted fields a study folder is bound to: all but the scheduling ones."""
    flat = flatten(json.loads(json.dumps(config.to_dict())))
    return {key: value for key, value in flat.items() if not key.startswith(UNBOUND_PREFIXES)}


def config_differences(recorded: dict, config: StudyConfig) -> list[str]:
    """The dotted fields whose value differs between a recorded config and `config` (scheduling fields aside)."""
    now = bound_fields(config)
    before = {key: value for key, value in flatten(recorded).items() if not key.startswith(UNBOUND_PREFIXES)}
    return sorted(key for key in set(now) | set(before) if now.get(key) != before.get(key))


def check_binding(out: Path, config: StudyConfig, resume: bool) -> None:
    """Refuse a folder that belongs to another study, or `--resume` under another configuration."""
    study = out / STUDY_FILE
    if not study.is_file():
        return
    try:
        recorded = json.loads(study.read_text())["config"]
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(str(study), f"unreadable study record ({error!r}); move it aside or choose "
                                      f"another --out") from None
    differing = config_differences(recorded, config)
    if resume and differing:
        now = flatten(json.loads(json.dumps(config.to_dict())))
        before = flatten(recorded)
        listed = "; ".join(f"{key}: {before.get(key)!r} in the study, {now.get(key)!r} now" for key in differing)
        raise ConfigError("--resume", f"{out} holds a study run with another configuration ({listed}); "
                                      f"resume it with its own configuration, or choose another --out")
    if not resume and any((out / TRIALS_DIR).glob("*.json")):
        raise ConfigError("--out", f"{out} already holds finished trials; pass --resume to complete that study "
                                   f"or choose another --out")


def record_study(out: Path, config: StudyConfig, key: str, **facts) -> None:
    """Write study.json, which binds the folder to this configuration, with the study's `facts`
    (its chance levels and reference losses, say)."""
    atomic_write_text(out / STUDY_FILE, json.dumps({"name": config.name, "tasks": config.eval.tasks, "key": key,
                                                    "config": config.to_dict(), **facts}, indent=1))


@contextlib.contextmanager
def hold(out: Path, script: str = "driver"):
    """Hold the folder's driver lock (re-entrant within a process); refuse if another process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    path = (out / LOCK_FILE).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError("--out", f"{out} is in use by another driver ({holder}); wait for it to finish "
                                   f"or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{script}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        os.close(fd)  # closing the last descriptor releases the lock


def check_unlocked(out: Path) -> None:
    """Refuse a folder another driver holds, without creating anything (`hold` takes the lock later)."""
    path = (out / LOCK_FILE).resolve()
    if path in _held or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        raise ConfigError("--out", f"{out} is in use by another driver ({holder}); wait for it to finish "
                                   f"or choose another --out") from None
    finally:
        os.close(fd)


def write_row(out: Path, row: dict) -> None:
    """Durably write one finished trial's row."""
    folder = out / TRIALS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{row['trial_id']}.json", json.dumps(row, default=float))


def finished_rows(out: Path) -> list[dict]:
    """The finished trials' rows. A damaged row file (empty, not JSON, no trial id, a name that is not its
    trial id) is moved to trials/damaged/ with one line on stderr; its cell counts as not run."""
    folder = out / TRIALS_DIR
    if not folder.is_dir():
        return []
    rows = []
    for path in sorted(folder.glob("*.json")):
        try:
            row = json.loads(path.read_text())
            if not isinstance(row, dict) or row.get("trial_id") != path.stem:
                raise ValueError("not the row of trial " + path.stem)
        except ValueError as error:
            damaged = folder / DAMAGED_DIR
            damaged.mkdir(exist_ok=True)
            target = damaged / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(path, target)
            fsync_folder(folder)
            reason = "empty file" if target.stat().st_size == 0 else str(error).splitlines()[0]
            print(f"warning: {path}: damaged row ({reason}); moved to {target}, its cell will run again",
                  file=sys.stderr)
            continue
        rows.append(row)
    return rows
