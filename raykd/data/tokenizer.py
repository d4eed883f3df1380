"""Tokenizer: a WordPiece model trained on the corpus, or a named/pathed HF one (SPEC §4).

The trained tokenizer is BERT's pipeline (lower-casing BERT normalizer,
whitespace-and-punctuation pre-tokenizer, WordPiece with "##" continuations,
[CLS] A [SEP] B [SEP] with token_type_ids) and is saved as a transformers
`BertTokenizer` directory, so `AutoTokenizer.from_pretrained(dir)` loads it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerBase

from raykd.io import atomic_path

# Fixed ids: the masking and packing code relies on [PAD]=0 .. [MASK]=4 for trained tokenizers.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask")


def train_wordpiece(batches: Iterable[list[str]], vocab_size: int, out_dir: str | Path,
                    *, model_max_length: int = 512) -> PreTrainedTokenizerBase:
    """Train WordPiece on batches of texts and save it to out_dir (replacing
    what is there, atomically); return it loaded through AutoTokenizer."""
    if not isinstance(vocab_size, int) or vocab_size < 64:
        raise ValueError(f"vocab_size must be an int >= 64, got {vocab_size!r}")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # The same components BertTokenizer rebuilds from the vocabulary when loaded.
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    tok.train_from_iterator(batches, trainer)
    vocab = tok.get_vocab()
    if [vocab.get(t) for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens did not get ids 0-4: {[vocab.get(t) for t in SPECIAL_TOKENS]}")
    hf = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=model_max_length)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as staging:
        hf.save_pretrained(staging)
        shutil.rmtree(out_dir, ignore_errors=True)  # a folder replaces only a missing or empty one
    return load_tokenizer(out_dir)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer by hub name or local directory, with BERT's special tokens checked."""
    looks_local = isinstance(name_or_path, Path) or str(name_or_path).startswith((".", "/", "~"))
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {name_or_path}")
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    special_ids(tokenizer)
    return tokenizer


def special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """{"pad", "unk", "cls", "sep", "mask"} -> id; a tokenizer lacking one is refused."""
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in SPECIAL_NAMES}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} lacks special tokens {missing} (BERT-style needed)")
    return ids
