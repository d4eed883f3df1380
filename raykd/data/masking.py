"""BERT dynamic masking, reproducible per (seed, pass, example id).

Every example draws its randomness from a counter-based generator keyed by
(seed, pass_index, example_id) — a splitmix64 stream — so the mask of an
example does not depend on which batch or worker it lands in, a rerun gives
identical masks, and a new pass gives fresh ones. The whole batch is drawn
in a few vectorised numpy operations, with no Python loop over examples.

Selection is an exact count, not Bernoulli: an example with n maskable
(non-special) tokens gets round(mask_prob · n) selected positions (half
rounds up), at least one when n > 0. With fixed-length packed sequences every
example then has the same number of masked positions, so the LM head's cost
(it runs only at masked positions) and hence the FLOP charge per step is
predictable. Each selected position independently becomes [MASK] (80 %), a
random non-special token (10 %) or stays unchanged (10 %), as in BERT.
"""
from collections.abc import Mapping

import numpy as np

IGNORE_INDEX = -100  # label of unselected positions; PyTorch's cross-entropy skips it

_MASK_SHARE = 0.8
_RANDOM_SHARE = 0.1

# splitmix64 constants (Steele, Lea & Flood 2014).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# Three independent draws per position: selection score, action, random token.
_DRAWS_PER_POSITION = 3


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective scrambling of uint64 arrays (wraps mod 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def _example_keys(seed: int, pass_index: np.ndarray, example_ids: np.ndarray) -> np.ndarray:
    """One uint64 key per example from (seed, pass_index, example_id)."""
    key = _mix(np.full(len(example_ids), seed, dtype=np.uint64) + _GOLDEN)
    key = _mix(key ^ pass_index.astype(np.uint64))
    return _mix(key ^ example_ids.astype(np.uint64))


def _uniforms(keys: np.ndarray, seq_len: int) -> np.ndarray:
    """Uniform floats in [0, 1), shape (B, seq_len, draws), from each example's stream."""
    counters = np.arange(1, seq_len * _DRAWS_PER_POSITION + 1, dtype=np.uint64)
    bits = _mix(keys[:, None] + counters[None, :] * _GOLDEN)
    return ((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53).reshape(
        len(keys), seq_len, _DRAWS_PER_POSITION
    )


def _random_tokens(draws: np.ndarray, specials: np.ndarray, vocab_size: int) -> np.ndarray:
    """Map uniforms to token ids drawn uniformly from the non-special vocabulary."""
    j = (draws * (vocab_size - len(specials))).astype(np.int64)
    # The j-th non-special id is j plus the number of specials at or below it;
    # `specials - arange` counts the non-special ids below each special.
    return j + np.searchsorted(specials - np.arange(len(specials)), j, side="right")


def mask_batch(
    input_ids: np.ndarray,
    example_ids: np.ndarray,
    pass_index,
    seed: int,
    *,
    special_ids: Mapping[str, int],
    vocab_size: int,
    mask_prob: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply BERT masking to a batch; return (masked_input_ids, labels), both int64 (B, L).

    `pass_index` is one int for the whole batch or one per example. Special
    tokens (every id in `special_ids`, padding included) are never selected.
    `labels` holds the original id at selected positions and -100 elsewhere.
    """
    if "mask" not in special_ids:
        raise ValueError(f"special_ids must name the 'mask' token; got {dict(special_ids)}")
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1); got {mask_prob}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative; got {seed}")
    tokens = np.asarray(input_ids, dtype=np.int64)
    if tokens.ndim != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seq_len); got shape {tokens.shape}")
    batch, seq_len = tokens.shape
    example_ids = np.asarray(example_ids, dtype=np.int64).reshape(batch)
    passes = np.broadcast_to(np.asarray(pass_index, dtype=np.int64), (batch,))
    specials = np.unique(np.fromiter(special_ids.values(), dtype=np.int64))

    draws = _uniforms(_example_keys(seed, passes, example_ids), seq_len)
    special = np.isin(tokens, specials)
    maskable = (~special).sum(axis=1)
    count = np.where(maskable > 0, np.maximum(1, np.floor(mask_prob * maskable + 0.5)), 0)

    # Exactly `count` positions per row: the lowest selection scores among maskable tokens.
    scores = np.where(special, 2.0, draws[..., 0])
    by_score = np.argsort(scores, axis=1, kind="stable")
    selected = np.zeros_like(special)
    np.put_along_axis(selected, by_score, np.arange(seq_len)[None, :] < count[:, None], axis=1)

    action = draws[..., 1]
    masked = tokens.copy()
    masked[selected & (action < _MASK_SHARE)] = special_ids["mask"]
    replace = selected & (action >= _MASK_SHARE) & (action < _MASK_SHARE + _RANDOM_SHARE)
    masked[replace] = _random_tokens(draws[..., 2][replace], specials, vocab_size)
    labels = np.where(selected, tokens, IGNORE_INDEX)
    return masked, labels
