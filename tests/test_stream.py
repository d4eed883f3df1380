"""The pretraining stream: pool size, exact repetition, order, workers, resume, masks, errors."""
import itertools
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raykd.data.masking import mask_batch
from raykd.data.stream import (
    PretrainStream,
    select_pool,
    unique_examples_for,
    unique_examples_from_tokens,
    validation_batches,
)

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
SEQ_LEN = 16
VOCAB = 64


def write_shards(root, num_train=500, num_validation=40, per_shard=120, seed=0):
    """A shard directory in the corpus format: meta.json + Parquet shards of random ids."""
    rng = np.random.default_rng(seed)
    meta = {
        "seq_len": SEQ_LEN,
        "vocab_size": VOCAB,
        "special_ids": SPECIALS,
        "tokenizer": "tokenizer",
        "corpus": {"source": "test"},
        "splits": {},
    }
    for split, count in (("train", num_train), ("validation", num_validation)):
        (root / split).mkdir(parents=True)
        shards = []
        for first in range(0, count, per_shard):
            rows = rng.integers(len(SPECIALS), VOCAB, (min(per_shard, count - first), SEQ_LEN))
            rows[:, 0], rows[:, -1] = SPECIALS["cls"], SPECIALS["sep"]
            table = pa.table(
                {
                    "example_id": pa.array(np.arange(first, first + len(rows)), pa.int64()),
                    "input_ids": pa.array(list(rows.astype(np.int32)), pa.list_(pa.int32())),
                }
            )
            path = f"{split}/shard-{len(shards):05d}.parquet"
            pq.write_table(table, root / path)
            shards.append({"path": path, "num_examples": len(rows), "first_example_id": first})
        meta["splits"][split] = {"num_examples": count, "num_tokens": count * SEQ_LEN, "shards": shards}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("corpus"))


def train_rows(root):
    """All train rows by example id, read with plain pyarrow."""
    table = pq.read_table(root / "train")
    order = np.argsort(table.column("example_id").to_numpy())
    return np.array(table.column("input_ids").to_pylist())[order]


def stream(root, **overrides):
    options = dict(unique_examples=100, seed=3, per_worker_batch=8)
    return PretrainStream(root, **{**options, **overrides})


def collect(batches):
    """Concatenate a list of batches into numpy columns."""
    return {name: np.concatenate([b[name].numpy() for b in batches]) for name in batches[0]}


# Pool size and pool choice ------------------------------------------------------------


def test_pool_size_from_budget_and_repetition():
    assert unique_examples_for(scratch_tokens=128_000, repetition=4, seq_len=128) == 250
    assert unique_examples_for(scratch_tokens=1000, repetition=1.5, seq_len=128) == 5
    assert unique_examples_for(scratch_tokens=10, repetition=8, seq_len=128) == 1
    assert unique_examples_from_tokens(1_000_000, seq_len=128) == 7812
    for bad in (0.5, 0, math.nan, math.inf):
        with pytest.raises(ValueError, match="repetition"):
            unique_examples_for(scratch_tokens=1000, repetition=bad, seq_len=128)
    with pytest.raises(ValueError, match="scratch_tokens"):
        unique_examples_for(scratch_tokens=0, repetition=1, seq_len=128)
    with pytest.raises(ValueError, match="unique_tokens"):
        unique_examples_from_tokens(-5, seq_len=128)


def test_pool_is_seeded_and_nested():
    pool = select_pool(1000, 200, seed=3)
    assert len(np.unique(pool)) == 200 and pool.min() >= 0 and pool.max() < 1000
    assert np.array_equal(pool, select_pool(1000, 200, seed=3))
    assert not np.array_equal(pool, select_pool(1000, 200, seed=4))
    assert set(select_pool(1000, 50, seed=3)) <= set(pool)  # higher repetition, subset pool


# The order, as planned (pure numpy) -----------------------------------------------------


def test_k_full_passes_show_every_example_exactly_k_times(corpus):
    plan = stream(corpus, max_passes=3)
    example_ids, pass_index = plan.plan(0, plan.num_steps)
    assert plan.num_steps == math.ceil(300 / 8)
    assert np.array_equal(np.unique(example_ids, return_counts=True)[1], np.full(100, 3))
    for p in range(3):  # each pass is a permutation of the pool
        assert np.array_equal(np.sort(example_ids[pass_index == p]), plan.pool)
    assert plan.epochs_at(plan.num_steps) == 3.0
    assert plan.tokens_seen(plan.num_steps) == 300 * SEQ_LEN
    assert plan.epochs_at(5) == 5 * 8 / 100
    assert plan.unique_tokens == 100 * SEQ_LEN


def test_passes_are_reshuffled_and_a_partial_pass_has_no_duplicates(corpus):
    endless = stream(corpus)
    example_ids, pass_index = endless.plan(0, 30)  # 240 examples: 2.4 passes
    assert endless.num_steps is None
    last = example_ids[pass_index == 2]
    assert len(last) == 40 and len(np.unique(last)) == 40
    assert not np.array_equal(example_ids[pass_index == 0], example_ids[pass_index == 1])


def test_same_seed_same_order_other_seed_other_order(corpus):
    order = stream(corpus).plan(0, 20)[0]
    assert np.array_equal(order, stream(corpus).plan(0, 20)[0])
    other = stream(corpus, seed=4).plan(0, 20)[0]
    assert not np.array_equal(order, other)


@pytest.mark.parametrize("world_size, rows_per_worker", [(2, [100, 100]), (3, [67, 67, 66])])
def test_workers_split_each_pass_disjointly_and_cover_the_pool(corpus, world_size, rows_per_worker):
    workers = [
        stream(corpus, rank=rank, world_size=world_size, max_passes=2) for rank in range(world_size)
    ]
    plans = [worker.plan(0, workers[0].num_steps) for worker in workers]
    for p in range(2):
        shards = [set(ids[passes == p]) for ids, passes in plans]
        assert sum(len(shard) for shard in shards) == 100  # disjoint ...
        assert set().union(*shards) == set(workers[0].pool)  # ... and covering
    # Full global batches give 8 rows to each worker; the last one (200 - 192 = 8 rows)
    # is split as evenly as it goes.
    assert [len(ids) for ids, _ in plans] == rows_per_worker


# The stream itself, through Ray Data ----------------------------------------------------


@pytest.fixture(scope="module")
def three_passes(corpus, ray_local):
    """One bounded stream read through Ray Data, with windows smaller than a pass."""
    return stream(corpus, max_passes=3, window_examples=64)


@pytest.fixture(scope="module")
def uninterrupted(three_passes):
    return list(three_passes.batches())


def test_stream_delivers_the_plan_with_seeded_masks(corpus, three_passes, uninterrupted):
    assert len(uninterrupted) == three_passes.num_steps
    assert [len(b["input_ids"]) for b in uninterrupted[-2:]] == [8, 4]  # 300 = 37·8 + 4
    got = collect(uninterrupted)
    example_ids, pass_index = three_passes.plan(0, three_passes.num_steps)
    assert np.array_equal(got["example_id"], example_ids)
    assert np.array_equal(got["pass_index"], pass_index)
    originals = train_rows(corpus)[example_ids]
    masked, labels = mask_batch(
        originals, example_ids, pass_index, 3, special_ids=SPECIALS, vocab_size=VOCAB
    )
    assert np.array_equal(got["input_ids"], masked)
    assert np.array_equal(got["labels"], labels)
    assert np.all(got["attention_mask"] == 1)
    assert all(tensor.dtype == torch.int64 for tensor in uninterrupted[0].values())


def test_same_seed_reruns_identically_and_other_seed_differs(corpus, uninterrupted):
    again = collect(list(stream(corpus, max_passes=3).batches()))
    first = collect(uninterrupted)
    assert all(np.array_equal(again[name], first[name]) for name in first)
    other = collect(list(itertools.islice(stream(corpus, seed=4).batches(), 13)))
    assert not np.array_equal(other["example_id"], first["example_id"][: len(other["example_id"])])


def test_resume_gives_exactly_the_remaining_batches(corpus, three_passes, uninterrupted):
    resumed = list(three_passes.batches(start_step=21))
    assert len(resumed) == len(uninterrupted) - 21
    for expected, got in zip(uninterrupted[21:], resumed):
        assert all(np.array_equal(expected[name], got[name]) for name in expected)
    # An endless stream, resumed mid-window, agrees with the bounded one.
    endless = list(itertools.islice(stream(corpus).batches(start_step=30), 5))
    for expected, got in zip(uninterrupted[30:35], endless):
        assert np.array_equal(expected["input_ids"], got["input_ids"])


def test_two_workers_read_disjoint_halves_of_a_pass(corpus, ray_local):
    halves = [
        collect(list(stream(corpus, rank=rank, world_size=2, max_passes=1).batches()))
        for rank in (0, 1)
    ]
    first, second = (set(half["example_id"]) for half in halves)
    assert len(first) + len(second) == 100
    assert first | second == set(select_pool(500, 100, seed=3))


def test_stream_runs_inside_a_placement_group_that_captures_child_tasks(corpus, ray_local, uninterrupted):
    """A Ray Train worker launched from a Tune trial has a half-CPU bundle and captures the
    tasks it submits; the stream must schedule nothing there (Ray Data's sort did, and failed)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0.5)
    class Reader:  # an actor, like a Ray Train worker; only installed modules inside
        def read(self, root):
            from raykd.data.stream import PretrainStream

            batches = PretrainStream(root, unique_examples=100, seed=3, per_worker_batch=8, max_passes=3,
                                     window_examples=64).batches()
            return [{name: tensor.numpy() for name, tensor in batch.items()} for batch in batches]

    group = placement_group([{"CPU": 0.5}])
    ray.get(group.ready(), timeout=60)
    try:
        capturing = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
        reader = Reader.options(scheduling_strategy=capturing).remote()
        batches = ray.get(reader.read.remote(corpus), timeout=300)
    finally:
        remove_placement_group(group)
    got = {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}
    expected = collect(uninterrupted)
    assert all(np.array_equal(got[name], expected[name]) for name in expected)


# Validation batches and bad input --------------------------------------------------------


def test_validation_batches_are_fixed_and_complete(corpus):
    batches = list(validation_batches(corpus, batch_size=16, seed=1))
    assert [len(b["input_ids"]) for b in batches] == [16, 16, 8]
    got = collect(batches)
    assert np.array_equal(got["example_id"], np.arange(40))
    assert np.all(got["pass_index"] == 0)
    again = collect(list(validation_batches(corpus / "meta.json", batch_size=7, seed=1)))
    assert np.array_equal(again["labels"], got["labels"])
    assert len(collect(list(validation_batches(corpus, 16, 1, max_examples=20)))["labels"]) == 20


def test_missing_and_corrupt_shards_are_named(tmp_path):
    root = write_shards(tmp_path / "c", num_train=100, num_validation=10, per_shard=50)
    shard = root / "train" / "shard-00001.parquet"
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.parquet"):
        stream(root, unique_examples=10)
    shard.write_bytes(b"not a parquet file")
    with pytest.raises(ValueError, match="shard-00001.parquet"):
        stream(root, unique_examples=10)
    pq.write_table(pq.read_table(root / "train" / "shard-00000.parquet").slice(0, 7), shard)
    with pytest.raises(ValueError, match="shard-00001.parquet.*7 rows"):
        stream(root, unique_examples=10)
    first_shard = root / "train" / "shard-00000.parquet"
    original = pq.read_table(first_shard)
    shifted = original.set_column(0, "example_id", pa.array(np.arange(50, 100), pa.int64()))
    pq.write_table(shifted, first_shard)
    with pytest.raises(ValueError, match="shard-00000.parquet: example ids span 50..99"):
        stream(root, unique_examples=10)
    pq.write_table(original, first_shard)
    pq.write_table(pa.table({"example_id": np.arange(50), "input_ids": ["text"] * 50}), shard)
    with pytest.raises(ValueError, match="shard-00001.parquet: input_ids is string"):
        stream(root, unique_examples=10)
    (root / "validation" / "shard-00000.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(ValueError, match="validation/shard-00000.parquet"):
        validation_batches(root, batch_size=4, seed=0)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        stream(tmp_path / "nowhere")


def test_rows_that_disagree_with_the_plan_stop_the_stream(tmp_path, ray_local):
    root = write_shards(tmp_path / "c", num_train=100, num_validation=10, per_shard=50)
    path = root / "train" / "shard-00001.parquet"
    table = pq.read_table(path)
    ids = np.arange(50, 100)
    ids[7] = 56  # a duplicated id: row and id counts and the id range still look right
    pq.write_table(table.set_column(0, "example_id", pa.array(ids, pa.int64())), path)
    with pytest.raises(ValueError, match="does not match its plan of 100 rows"):
        list(stream(root, unique_examples=100, max_passes=1).batches())


def test_bad_stream_settings_name_the_field(corpus):
    with pytest.raises(ValueError, match="unique_examples=501 exceeds the 500 examples"):
        stream(corpus, unique_examples=501)
    with pytest.raises(ValueError, match="rank"):
        stream(corpus, rank=2, world_size=2)
    with pytest.raises(ValueError, match="per_worker_batch"):
        stream(corpus, per_worker_batch=0)
    with pytest.raises(ValueError, match="max_passes"):
        stream(corpus, max_passes=0)
    with pytest.raises(ValueError, match="start_step"):
        stream(corpus).batches(start_step=-1)
