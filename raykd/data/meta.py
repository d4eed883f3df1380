"""A prepared corpus's meta.json: the one reader, for a local folder or a storage URI alike.

`load_meta` reads the file and its top-level fields; `check_shards` checks one
split's shards from their Parquet footers (no data is read); `check_corpus`
checks the whole corpus (both splits, the tokenizer, the special tokens), as
`prepare_corpus` does before it reuses a prepared one. Errors name the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raykd import storage

META_FILE = "meta.json"
SPLITS = ("train", "validation")
_FIELDS = ("seq_len", "vocab_size", "special_ids", "tokenizer", "splits")


def load_meta(meta_path: str | Path) -> dict:
    """meta.json of a prepared corpus (its folder or the file; a local path or a storage URI), with
    "root" added: the folder, as an absolute path or a URI. Checks that it parses and has the
    top-level fields; `check_corpus` checks the shards too."""
    path = str(meta_path)
    if not path.endswith(".json"):
        path = storage.join(path, META_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(f"corpus metadata not found: {path}")
    try:
        meta = json.loads(storage.read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"corrupt corpus metadata {path}: {error}") from None
    for field in _FIELDS:
        if field not in meta:
            raise ValueError(f"corpus metadata {path} lacks the field {field!r}")
    return {**meta, "root": storage.root(path.rsplit("/", 1)[0])}


def check_shards(meta: dict, split: str) -> list[dict]:
    """Check a split's shards from their Parquet footers; return the shard entries with full paths
    (paths within the storage's filesystem, see `raykd.storage`).

    Raises FileNotFoundError or ValueError naming the missing or corrupt file.
    """
    root = meta["root"]
    if split not in meta["splits"]:
        raise ValueError(f"corpus metadata in {root} has no split '{split}'")
    filesystem = storage.filesystem(root)[0]
    shards = []
    for entry in meta["splits"][split]["shards"]:
        uri = storage.join(root, entry["path"])
        path = storage.filesystem(uri)[1]
        if not storage.is_file(uri):
            raise FileNotFoundError(f"shard not found: {uri}")
        try:
            with filesystem.open_input_file(path) as file:
                footer = pq.ParquetFile(file).metadata
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"corrupt shard {uri}: {error}") from None
        schema = footer.schema.to_arrow_schema()
        if "example_id" not in schema.names or "input_ids" not in schema.names:
            raise ValueError(f"corrupt shard {uri}: columns {schema.names} lack example_id/input_ids")
        token_type = schema.field("input_ids").type
        if not (pa.types.is_list(token_type) and pa.types.is_integer(token_type.value_type)):
            raise ValueError(f"corrupt shard {uri}: input_ids is {token_type}, not a list of integers")
        if footer.num_rows != entry["num_examples"]:
            raise ValueError(
                f"corrupt shard {uri}: {footer.num_rows} rows, metadata says {entry['num_examples']}"
            )
        first, last = _id_range(footer, schema.get_field_index("example_id"))
        expected = (entry["first_example_id"], entry["first_example_id"] + entry["num_examples"] - 1)
        if first is not None and (first, last) != expected:
            raise ValueError(f"corrupt shard {uri}: example ids span {first}..{last}, metadata says "
                             f"{expected[0]}..{expected[1]}")
        shards.append({**entry, "path": path})
    return shards


def _id_range(footer: pq.FileMetaData, column: int) -> tuple[int | None, int | None]:
    """Smallest and largest example id from the footer's statistics (None if not written)."""
    low, high = None, None
    for group in range(footer.num_row_groups):
        stats = footer.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max:
            return None, None
        low = stats.min if low is None else min(low, stats.min)
        high = stats.max if high is None else max(high, stats.max)
    return low, high


def check_corpus(meta: dict) -> None:
    """The whole prepared corpus of `meta` (from `load_meta`): its special tokens, its tokenizer
    folder, and every split's shards, contiguous from example id 0 and as counted in meta.json."""
    from raykd.data.tokenizer import SPECIAL_NAMES  # imports transformers: only here

    root = meta["root"]
    if set(meta["special_ids"]) != set(SPECIAL_NAMES):
        raise ValueError(f"corpus metadata in {root}: special_ids must have exactly {SPECIAL_NAMES}")
    tokenizer = storage.join(root, meta["tokenizer"])
    if not storage.exists(tokenizer):
        raise FileNotFoundError(f"tokenizer directory not found: {tokenizer} (listed in {root}/{META_FILE})")
    for split in SPLITS:
        next_id = 0
        for shard in check_shards(meta, split):
            if shard["first_example_id"] != next_id:
                raise ValueError(f"shard {shard['path']} starts at example id {shard['first_example_id']}; "
                                 f"the split's earlier shards end at {next_id - 1}")
            next_id += shard["num_examples"]
        info = meta["splits"][split]
        if next_id != info["num_examples"] or info["num_tokens"] != next_id * meta["seq_len"]:
            raise ValueError(f"corpus metadata in {root}: split {split!r} counts disagree with its shards")
