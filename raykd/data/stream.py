"""The pretraining stream: a seeded unique pool, repeated pass after pass.

Repetition r fixes the unique pool (SPEC §4): U = T_scratch / r tokens, as
whole examples, chosen by seed from the train split. Pass p visits the pool
in a permutation seeded by (seed, p); the passes are concatenated into one
global stream, cut into global batches of world_size × per_worker_batch
examples, and worker `rank` takes its slice of every global batch. So within
a pass no example reaches two workers, over k full passes every example is
seen exactly k times, and every strategy at the same (budget, r, seed) sees
the same examples in the same order.

The order is a pure numpy function of (pool, seed, pass, rank, world_size),
so resuming at any step costs nothing but arithmetic. Ray Data does the
streaming work, one window of steps at a time: it reads the Parquet shards
holding the window's examples and emits every occurrence of each example with
its position in the window, masked (seeded by (seed, pass, example id), see
`masking`); the worker puts the window's rows in order by that position and
batches them, while the next window is read in the background.
"""
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
import torch

from raykd import storage
from raykd.data.masking import mask_batch
from raykd.data.meta import check_shards, load_meta

# Seed-sequence tags keep the pool and the pass orders independent draws of one seed.
_POOL_TAG = 0
_ORDER_TAG = 1
# Windows start small (a quick first batch, cheap resumes and short trials) and
# double up to one pass of this worker's rows, clamped: small pools would pay Ray
# Data's start-up too often, and a window is held in the worker's memory to be
# put in order (2^17 rows of 128 int32 ids and labels: 128 MiB).
_FIRST_WINDOW_EXAMPLES = 1 << 12
_MIN_WINDOW_EXAMPLES = 1 << 14
_MAX_WINDOW_EXAMPLES = 1 << 17
_CHUNK_STEPS = 64


def unique_examples_for(scratch_tokens: int, repetition: float, seq_len: int) -> int:
    """Size of the unique pool in examples: U = scratch_tokens / repetition tokens (at least 1)."""
    if not (isinstance(repetition, (int, float)) and math.isfinite(repetition) and repetition >= 1):
        raise ValueError(f"repetition must be a finite number >= 1; got {repetition!r}")
    if scratch_tokens <= 0:
        raise ValueError(f"scratch_tokens must be positive; got {scratch_tokens!r}")
    return unique_examples_from_tokens(scratch_tokens / repetition, seq_len)


def unique_examples_from_tokens(unique_tokens: float, seq_len: int) -> int:
    """Size of a pool given directly in tokens, as whole examples (rounded down, at least 1)."""
    if unique_tokens <= 0:
        raise ValueError(f"unique_tokens must be positive; got {unique_tokens!r}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive; got {seq_len!r}")
    return max(1, int(unique_tokens // seq_len))


def select_pool(num_examples: int, unique_examples: int, seed: int) -> np.ndarray:
    """The sorted example ids of the unique pool: a seeded choice of `unique_examples` ids.

    Pools of one seed are nested: a smaller pool (higher repetition) is a
    subset of a larger one.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _POOL_TAG])))
    return np.sort(rng.permutation(num_examples)[:unique_examples])


def pass_order(pool: np.ndarray, seed: int, pass_index: int) -> np.ndarray:
    """The pool's example ids in the order pass `pass_index` visits them."""
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, _ORDER_TAG, pass_index]))
    )
    return pool[rng.permutation(len(pool))]


def _token_matrix(column, seq_len: int) -> np.ndarray:
    """A list<int> Arrow column of fixed-length rows as an (n, seq_len) numpy array."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths.min() != seq_len or lengths.max() != seq_len):
        raise ValueError(f"shard rows must hold exactly seq_len={seq_len} token ids")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), seq_len)


def _mask_rows(tokens, example_ids, pass_index, seed, special_ids, vocab_size, mask_prob) -> dict:
    """Masked input ids and labels of token rows, as int32 (widened to int64 at the tensor step)."""
    input_ids, labels = mask_batch(
        tokens,
        example_ids,
        pass_index,
        seed,
        special_ids=special_ids,
        vocab_size=vocab_size,
        mask_prob=mask_prob,
    )
    return {"input_ids": input_ids.astype(np.int32), "labels": labels.astype(np.int32)}


def _to_tensors(columns: dict, pad_id: int) -> dict:
    """The training batch: int64 tensors, attention_mask from padding ([MASK] is never padding)."""
    batch = {
        name: torch.tensor(np.asarray(columns[name]), dtype=torch.int64)
        for name in ("input_ids", "labels", "example_id", "pass_index")
    }
    batch["attention_mask"] = (batch["input_ids"] != pad_id).long()
    return batch


class _WindowRows:
    """Ray Data batch function: shard rows -> every occurrence in the window, masked.

    An example occurs more than once in a window that spans passes; the
    window's plan is kept sorted by example id, so each row's occurrences are
    a contiguous run found with two binary searches.
    """

    def __init__(self, example_ids, pass_index, seq_len, masking: dict):
        self.order = np.argsort(example_ids, kind="stable")  # sorted index -> window position
        self.example_ids = example_ids[self.order]
        self.pass_index = pass_index[self.order]
        self.seq_len = seq_len
        self.masking = masking

    def __call__(self, table: pa.Table) -> dict:
        ids = table.column("example_id").to_numpy()
        first = np.searchsorted(self.example_ids, ids, side="left")
        counts = np.searchsorted(self.example_ids, ids, side="right") - first
        rows = np.repeat(np.arange(len(ids)), counts)
        run_starts = np.repeat(np.cumsum(counts) - counts, counts)
        occurrence = np.repeat(first, counts) + np.arange(len(rows)) - run_starts
        tokens = _token_matrix(table.column("input_ids"), self.seq_len)[rows]
        example_ids, pass_index = ids[rows], self.pass_index[occurrence]
        return {
            "position": self.order[occurrence],
            "example_id": example_ids,
            "pass_index": pass_index,
            **_mask_rows(tokens, example_ids, pass_index, **self.masking),
        }


class PretrainStream:
    """One training worker's view of the repeated, masked pretraining stream.

    `unique_examples` is the pool size (see `unique_examples_for`);
    `max_passes` bounds the stream (None: endless). Step s is global batch s:
    every worker yields its slice of it as its s-th batch. `window_examples`
    caps the rows read and put in order at once (default: one pass of this
    worker's rows, clamped to [2^14, 2^17]); it changes speed, never the stream.
    """

    def __init__(
        self,
        meta_path,
        *,
        unique_examples: int,
        seed: int,
        per_worker_batch: int,
        rank: int = 0,
        world_size: int = 1,
        mask_prob: float = 0.15,
        max_passes: int | None = None,
        window_examples: int | None = None,
    ):
        meta = load_meta(meta_path)
        self.root = meta["root"]
        self.filesystem = storage.filesystem(self.root)[0]
        self.shards = check_shards(meta, "train")
        num_examples = meta["splits"]["train"]["num_examples"]
        if unique_examples < 1:
            raise ValueError(f"unique_examples must be >= 1; got {unique_examples}")
        if unique_examples > num_examples:
            raise ValueError(
                f"unique_examples={unique_examples} exceeds the {num_examples} examples of the "
                f"train split in {self.root}; use a larger corpus or a higher repetition"
            )
        if seed < 0:
            raise ValueError(f"seed must be non-negative; got {seed}")
        if per_worker_batch < 1:
            raise ValueError(f"per_worker_batch must be >= 1; got {per_worker_batch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1); got {mask_prob}")
        if max_passes is not None and max_passes < 1:
            raise ValueError(f"max_passes must be >= 1 or None; got {max_passes}")
        self.seq_len = meta["seq_len"]
        self.vocab_size = meta["vocab_size"]
        self.special_ids = meta["special_ids"]
        self.seed = seed
        self.per_worker_batch = per_worker_batch
        self.rank = rank
        self.world_size = world_size
        self.mask_prob = mask_prob
        self.pool = select_pool(num_examples, unique_examples, seed)
        self.global_batch = world_size * per_worker_batch
        self.total_examples = None if max_passes is None else max_passes * unique_examples
        if window_examples is None:
            window_examples = min(
                max(-(-unique_examples // world_size), _MIN_WINDOW_EXAMPLES), _MAX_WINDOW_EXAMPLES
            )
        self.window_steps = max(1, window_examples // per_worker_batch)
        self.first_window_steps = max(1, min(window_examples, _FIRST_WINDOW_EXAMPLES) // per_worker_batch)

    @property
    def unique_examples(self) -> int:
        return len(self.pool)

    @property
    def unique_tokens(self) -> int:
        return len(self.pool) * self.seq_len

    @property
    def num_steps(self) -> int | None:
        """Global batches in a bounded stream (the last may be partial); None if endless."""
        if self.total_examples is None:
            return None
        return -(-self.total_examples // self.global_batch)

    def _examples_before(self, step: int) -> int:
        seen = step * self.global_batch
        return seen if self.total_examples is None else min(seen, self.total_examples)

    def tokens_seen(self, step: int) -> int:
        """Tokens all workers together have consumed after `step` steps."""
        return self._examples_before(step) * self.seq_len

    def epochs_at(self, step: int) -> float:
        """Passes over the pool (fractional) completed after `step` steps."""
        return self._examples_before(step) / self.unique_examples

    def plan(self, start_step: int, stop_step: int) -> tuple[np.ndarray, np.ndarray]:
        """(example_ids, pass_index) this worker reads over steps [start_step, stop_step), in order.

        Global batch s covers stream positions [s·G, (s+1)·G); this worker's
        slice is its part of `np.array_split` of that range into world_size
        parts (equal for every full global batch).
        """
        steps = np.arange(start_step, stop_step, dtype=np.int64)
        low = steps * self.global_batch
        high = low + self.global_batch
        if self.total_examples is not None:
            high = np.minimum(high, self.total_examples)
            low = np.minimum(low, high)
        share, extra = np.divmod(high - low, self.world_size)
        starts = low + self.rank * share + np.minimum(self.rank, extra)
        sizes = share + (self.rank < extra)
        positions = np.repeat(starts - np.cumsum(sizes) + sizes, sizes) + np.arange(sizes.sum())
        pass_index = positions // self.unique_examples
        example_ids = np.empty_like(positions)
        for p in np.unique(pass_index):
            in_pass = pass_index == p
            order = pass_order(self.pool, self.seed, int(p))
            example_ids[in_pass] = order[positions[in_pass] % self.unique_examples]
        return example_ids, pass_index

    def _window(self, example_ids: np.ndarray, pass_index: np.ndarray) -> ray.data.Dataset:
        """A Ray Dataset of the planned rows, masked, each with its position in the window (any row order)."""
        masking = {
            "seed": self.seed,
            "special_ids": self.special_ids,
            "vocab_size": self.vocab_size,
            "mask_prob": self.mask_prob,
        }
        wanted = np.unique(example_ids)
        paths = [
            shard["path"]
            for shard in self.shards
            if np.searchsorted(wanted, shard["first_example_id"])
            < np.searchsorted(wanted, shard["first_example_id"] + shard["num_examples"])
        ]
        # Ray 2.60's default (V2) Parquet reader lists files in threads that take ~8 s
        # per read here and race on an optional import (fsspec's HTTP filesystem without
        # aiohttp), failing at random; the V1 reader does neither. The dataset keeps
        # the context it was created under.
        context = ray.data.DataContext.get_current().copy()
        context.use_datasource_v2 = False
        context.enable_progress_bars = False
        with ray.data.DataContext.current(context):
            dataset = ray.data.read_parquet(paths, filesystem=self.filesystem, columns=["example_id", "input_ids"])
        return dataset.map_batches(
            _WindowRows(example_ids, pass_index, self.seq_len, masking),
            batch_format="pyarrow",
            zero_copy_batch=True,
        )

    def batches(self, start_step: int = 0) -> Iterator[dict]:
        """Yield this worker's batches from global step `start_step` on, as int64 torch tensors.

        Keys: input_ids (masked), labels (-100 where not masked), attention_mask,
        example_id, pass_index. Resuming at step s yields exactly the batches
        s, s+1, … of an uninterrupted stream, without reading earlier ones.
        """
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0; got {start_step}")
        return self._batches(start_step)

    def _batches(self, start_step: int) -> Iterator[dict]:
        windows = self._windows(start_step)
        bounds = next(windows, None)
        # The next window is read and put in order in the background while this
        # one is consumed, hiding Ray Data's start-up.
        opener = ThreadPoolExecutor(max_workers=1)
        try:
            upcoming = opener.submit(self._open, *bounds) if bounds else None
            while upcoming is not None:
                current = upcoming.result()
                bounds = next(windows, None)
                upcoming = opener.submit(self._open, *bounds) if bounds else None
                for columns in current:
                    chunk = _to_tensors(columns, self.special_ids["pad"])
                    for begin in range(0, len(chunk["example_id"]), self.per_worker_batch):
                        yield {name: t[begin : begin + self.per_worker_batch] for name, t in chunk.items()}
        finally:
            # A consumer that stops early waits here for a window still opening, so
            # no thread outlives the stream (e.g. into ray.shutdown).
            opener.shutdown(wait=True, cancel_futures=True)

    def _windows(self, step: int) -> Iterator[tuple[int, int]]:
        """[start, stop) step ranges of consecutive windows from `step` on, doubling in size."""
        size = self.first_window_steps
        while self.num_steps is None or step < self.num_steps:
            stop = step + size
            if self.num_steps is not None:
                stop = min(stop, self.num_steps)
            yield step, stop
            step, size = stop, min(2 * size, self.window_steps)

    def _open(self, start_step: int, stop_step: int) -> Iterator[dict]:
        """Read a window's rows with Ray Data and put them in planned order; chunks of numpy columns.

        The order is restored here, by position, rather than by Ray Data's sort: inside a
        Tune trial that sort's map tasks can land in the training worker's placement
        group, where they never fit. A chunk holds whole steps; Ray Data's cost per
        batch (~0.5 ms here) would exceed a small model's step.
        """
        example_ids, pass_index = self.plan(start_step, stop_step)
        if len(example_ids) == 0:
            return iter(())
        parts = list(self._window(example_ids, pass_index).iter_batches(batch_size=None, batch_format="numpy"))
        parts = [part for part in parts if len(part["position"])]
        positions = np.concatenate([part["position"] for part in parts]) if parts else np.empty(0, np.int64)
        order = np.argsort(positions, kind="stable")
        if not np.array_equal(positions[order], np.arange(len(example_ids))):
            raise ValueError(
                f"the window from step {start_step} does not match its plan of {len(example_ids)} rows "
                f"({len(positions)} delivered): the shards' example ids disagree with meta.json"
            )
        columns = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        rows = self.per_worker_batch * _CHUNK_STEPS
        return ({name: column[order[begin : begin + rows]] for name, column in columns.items()}
                for begin in range(0, len(order), rows))


def validation_batches(
    meta_path, batch_size: int, seed: int, max_examples: int | None = None, mask_prob: float = 0.15
) -> Iterator[dict]:
    """Fixed-mask batches (pass 0) of the validation split, in shard order, read with pyarrow.

    Same keys and dtypes as `PretrainStream.batches`; used for the MLM validation loss.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None; got {max_examples}")
    meta = load_meta(meta_path)
    filesystem = storage.filesystem(meta["root"])[0]
    tables = []
    for shard in check_shards(meta, "validation"):
        try:
            tables.append(pq.read_table(shard["path"], columns=["example_id", "input_ids"], filesystem=filesystem))
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"corrupt shard {shard['path']}: {error}") from None
    examples = pa.concat_tables(tables)
    if max_examples is not None:
        examples = examples.slice(0, max_examples)
    return _validation_batches(examples, meta, batch_size, seed, mask_prob)


def _validation_batches(examples: pa.Table, meta: dict, batch_size, seed, mask_prob):
    for begin in range(0, examples.num_rows, batch_size):
        rows = examples.slice(begin, batch_size)
        tokens = _token_matrix(rows.column("input_ids"), meta["seq_len"])
        example_ids = rows.column("example_id").to_numpy()
        columns = _mask_rows(
            tokens, example_ids, 0, seed, meta["special_ids"], meta["vocab_size"], mask_prob
        )
        columns.update(example_id=example_ids, pass_index=np.zeros(len(example_ids), np.int64))
        yield _to_tensors(columns, meta["special_ids"]["pad"])
