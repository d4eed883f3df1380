"""BERT dynamic masking: counts, the 80/10/10 split, specials, labels, determinism."""
import numpy as np
import pytest

from raykd.data.masking import IGNORE_INDEX, mask_batch

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
VOCAB = 8192


def packed_rows(count, seq_len=128, vocab=VOCAB, seed=0):
    """Rows as the shards hold them: [CLS] ... [SEP], ordinary tokens in between."""
    rows = np.random.default_rng(seed).integers(len(SPECIALS), vocab, (count, seq_len))
    rows[:, 0], rows[:, -1] = SPECIALS["cls"], SPECIALS["sep"]
    return rows


def mask(rows, example_ids, pass_index=0, seed=7, mask_prob=0.15):
    return mask_batch(
        rows, example_ids, pass_index, seed, special_ids=SPECIALS, vocab_size=VOCAB, mask_prob=mask_prob
    )


def test_exact_count_of_non_special_positions_is_selected():
    rows = packed_rows(64)
    rows[5, 100:] = SPECIALS["pad"]  # a padded row: 99 maskable tokens
    rows[6, 1:-1] = SPECIALS["unk"]  # nothing maskable at all
    _, labels = mask(rows, np.arange(64))
    selected = (labels != IGNORE_INDEX).sum(axis=1)
    assert selected[0] == 19  # round(0.15 · 126) = round(18.9)
    assert selected[5] == 15  # round(0.15 · 99) = round(14.85)
    assert selected[6] == 0
    tiny = packed_rows(1, seq_len=4)  # 2 maskable tokens: 0.3 rounds to 0, but at least 1
    assert (mask(tiny, [0])[1] != IGNORE_INDEX).sum() == 1


def test_specials_never_selected_labels_hold_originals_and_rest_unchanged():
    rows = packed_rows(32)
    rows[:, 60:64] = SPECIALS["pad"]
    masked, labels = mask(rows, np.arange(32))
    selected = labels != IGNORE_INDEX
    assert not selected[np.isin(rows, list(SPECIALS.values()))].any()
    assert np.array_equal(labels[selected], rows[selected])
    assert np.array_equal(masked[~selected], rows[~selected])
    assert masked.dtype == labels.dtype == np.int64


def test_80_10_10_split_and_random_tokens_are_ordinary():
    rows = packed_rows(2000)
    masked, labels = mask(rows, np.arange(2000))
    selected = labels != IGNORE_INDEX
    became_mask = masked[selected] == SPECIALS["mask"]
    kept = masked[selected] == rows[selected]
    randomised = ~became_mask & ~kept
    total = selected.sum()  # 38 000 selections: a share's standard error is < 0.002
    assert abs(became_mask.sum() / total - 0.8) < 0.01
    assert abs(randomised.sum() / total - 0.1) < 0.008
    assert abs(kept.sum() / total - 0.1) < 0.008
    replaced = masked[selected][randomised]
    assert replaced.min() >= len(SPECIALS) and replaced.max() < VOCAB
    # Random tokens cover the ordinary vocabulary evenly (both halves about equally).
    assert abs((replaced < (VOCAB + len(SPECIALS)) / 2).mean() - 0.5) < 0.05


def test_random_tokens_skip_specials_anywhere_in_the_vocabulary():
    specials = {"pad": 0, "mask": 5, "cls": 9}  # ids scattered, not a prefix
    rows = np.full((400, 32), 7)
    masked, labels = mask_batch(rows, np.arange(400), 0, 1, special_ids=specials, vocab_size=12, mask_prob=0.5)
    replaced = masked[(labels != IGNORE_INDEX) & (masked != 5) & (masked != 7)]
    assert set(np.unique(replaced)) == {1, 2, 3, 4, 6, 8, 10, 11}


def test_selection_is_uniform_over_positions():
    rows = packed_rows(4000)
    _, labels = mask(rows, np.arange(4000))
    rate = (labels[:, 1:-1] != IGNORE_INDEX).mean(axis=0)
    assert np.all(np.abs(rate - 19 / 126) < 0.025)  # standard error per position ≈ 0.006


def test_mask_depends_only_on_seed_pass_and_example_id():
    rows = packed_rows(16)
    ids = np.arange(100, 116)
    masked, labels = mask(rows, ids, pass_index=3)
    # Same examples in another batch composition and order: identical rows.
    order = np.array([9, 2, 15, 0])
    other_masked, other_labels = mask(
        np.vstack([packed_rows(3, seed=5), rows[order]]), np.r_[[1, 2, 3], ids[order]], pass_index=3
    )
    assert np.array_equal(other_masked[3:], masked[order])
    assert np.array_equal(other_labels[3:], labels[order])
    # Per-example pass indices give the same answer as one scalar.
    assert np.array_equal(mask(rows, ids, pass_index=np.full(16, 3))[0], masked)
    # A new pass, a new seed or another id: fresh masks.
    assert not np.array_equal(mask(rows, ids, pass_index=4)[1], labels)
    assert not np.array_equal(mask(rows, ids, pass_index=3, seed=8)[1], labels)
    assert not np.array_equal(mask(rows, ids + 1, pass_index=3)[1], labels)


def test_bad_arguments_name_the_field():
    rows = packed_rows(2, seq_len=8)
    with pytest.raises(ValueError, match="special_ids"):
        mask_batch(rows, [0, 1], 0, 0, special_ids={"pad": 0}, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="mask_prob"):
        mask(rows, [0, 1], mask_prob=1.5)
    with pytest.raises(ValueError, match="input_ids"):
        mask(rows[0], [0])
