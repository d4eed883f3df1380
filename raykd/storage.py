"""The storage URI: the one place every node of the cluster reads from and writes to.

`--storage` is a local or shared folder, or any URI pyarrow's filesystems take
(`s3://bucket/prefix`, `gs://…`); the default is `OUT/ray`. Credentials come
from pyarrow's own chain (environment, instance profile), never from raykd.

    <storage>/stages/data-<hash>/      corpus shards, meta.json, tokenizer/
    <storage>/stages/tasks-<hash>/     the embedded GLUE-shaped tasks
    <storage>/stages/teacher-<hash>/   the self-pretrained teacher (model/, teacher.json)
    <storage>/studies/<key>/trials/    each finished trial's row (the driver writes it)
    <storage>/<run name>/              Ray Train and Tune runs, their checkpoints

A stage is published once, under its hash, with a marker object written last:
a reader that sees the marker sees every file (an object store has no rename).
Libraries that want a local folder (HF models, tokenizers, task files) get a
node-local copy under the node's own cache, made once per URI: a published
stage never changes, so a copy never goes stale.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa
from pyarrow import fs as pafs

STAGES = "stages"
STUDIES = "studies"
PUBLISHED = "_PUBLISHED"


def filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of `uri` and the path within it (a plain path is a local folder)."""
    uri = str(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise ValueError(f"storage {uri!r}: {error}") from None


def is_local(uri: str | Path) -> bool:
    return isinstance(filesystem(uri)[0], pafs.LocalFileSystem)


def join(uri: str | Path, *parts: str) -> str:
    """`uri`/part/…, keeping the scheme (so it stays a URI every node can open)."""
    return "/".join([str(uri).rstrip("/"), *parts])


def root(storage: str | Path) -> str:
    """The storage as every node names it: an absolute path, or the URI as given."""
    uri = str(storage)
    return filesystem(uri)[1] if "://" not in uri else uri.rstrip("/")


def uri_of(storage: str, fs_path: str) -> str:
    """The URI of `fs_path`, a path inside `storage`'s filesystem (as Ray reports checkpoint paths)."""
    base = filesystem(storage)[1].rstrip("/")
    fs_path = fs_path.rstrip("/")
    if fs_path != base and not fs_path.startswith(base + "/"):
        raise ValueError(f"{fs_path} is not inside the storage {storage}")
    return root(storage) + fs_path[len(base):]


def exists(uri: str | Path) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str | Path) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(uri: str | Path) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(uri: str | Path) -> str:
    return read_bytes(uri).decode()


def write_text(uri: str | Path, text: str) -> None:
    """Write a whole file at once: a temporary file renamed in place locally, one PUT on an object store."""
    fs, path = filesystem(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        staging = f"{path}.tmp-{os.getpid()}"
        Path(staging).write_text(text)
        os.replace(staging, path)
        return
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def list_files(uri: str | Path, suffix: str = "") -> list[str]:
    """URIs of the files directly inside folder `uri` whose names end with `suffix` (none if it is missing)."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(join(uri, info.base_name) for info in infos
                  if info.type == pafs.FileType.File and info.base_name.endswith(suffix))


def stage_uri(storage: str | Path, name: str) -> str:
    return join(root(storage), STAGES, name)


def is_published(uri: str | Path) -> bool:
    return exists(join(uri, PUBLISHED))


def publish(local_dir: str | Path, uri: str) -> str:
    """Copy a finished local folder to `uri` and write the marker last; a published stage is left as is.

    Two drivers publishing the same stage write the same bytes (a stage is named by
    its hash), so their copies may interleave; a crash mid-copy leaves no marker and
    the next publisher copies again over the remains.
    """
    if is_published(uri):
        return uri
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    write_text(join(uri, PUBLISHED), "")
    return uri


def download(uri: str | Path, local_dir: str | Path) -> None:
    """Copy the folder `uri` to `local_dir` (created)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"not found in the storage: {uri}")
    # copy_files writes the files but does not make the local folders an object store only implies.
    base = path.rstrip("/")
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        relative = os.path.dirname(info.path[len(base) + 1:])
        os.makedirs(os.path.join(local_dir, relative), exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


@contextlib.contextmanager
def local_folder(uri: str | Path):
    """For the block: a local folder with what `uri` holds (itself when local, else a temporary download)."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="raykd-") as folder:
        target = os.path.join(folder, os.path.basename(path.rstrip("/")))
        download(uri, target)
        yield target


def local_copy(uri: str | Path, cache_dir: str | Path | None = None) -> str:
    """A folder on this node with what `uri` holds: the folder itself when the storage is local,
    else a copy in this node's cache (`RAYKD_CACHE`), downloaded once per URI and renamed into place."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    if cache_dir is None:
        from raykd.stages import default_cache_dir

        cache_dir = default_cache_dir()
    digest = hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    target = Path(cache_dir) / "from-storage" / f"{digest}-{os.path.basename(path.rstrip('/'))}"
    if target.is_dir():
        return str(target)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        download(uri, staging)
        os.rename(staging, target)
    except OSError:  # another process on this node finished first, or the download failed
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():
            raise
    return str(target)
