"""Is the synthetic language learnable, and how much does its lexicon size matter? MLM validation loss vs the unigram entropy.

Pretrains the local preset's `scratch` student at the preset's budget (Ray Train, one worker, the
whole training corpus as the pool) on the embedded language with several lexicon sizes
(`data.num_words`), each its own corpus of the preset's shape. Prints each one's MLM validation
loss (nats per masked token, fixed masks) next to the unigram entropy of the masked tokens, the
loss of a model that ignores context, and the gap between them. The local preset's lexicon must
be learnable: its gap at least 1 nat (issue 11's bar for `scratch`).

    python bench/learnability.py                    # 400, 1000 and 3000 words: about 10 minutes on 2 cores
    python bench/learnability.py --words 400 2000   # other sizes
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raykd.config import ConfigError, load_config  # noqa: E402

REQUIRED_GAP = 1.0  # nats below the unigram entropy that the local preset's student must reach


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="where the corpus is cached (default: $RAYKD_CACHE or ~/.cache/raykd)")
    parser.add_argument("--words", type=int, nargs="+", default=[400, 1000, 3000],
                        help="lexicon sizes (data.num_words) to compare")
    parser.add_argument("--documents", type=int, default=None,
                        help="train documents per corpus (default: the local preset's)")
    args = parser.parse_args()
    from raykd.data.meta import load_meta
    from raykd.data.shards import unigram_entropy
    from raykd.stages import default_cache_dir, prepare_data
    from raykd.recipes import pretrain_cell

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    preset_words = load_config("local").data.num_words
    def overrides(words: int) -> list[str]:
        # 1000 held-out documents (about 1500 sequences, 30k masked tokens): losses to a few hundredths of a nat.
        return [f"data.num_words={words}", "data.validation_documents=1000", "train.validation_examples=1024",
                *([f"data.num_documents={args.documents}"] if args.documents is not None else [])]

    try:  # every lexicon size and --documents checked before any corpus is built
        for words in args.words:
            load_config("local", overrides=["strategies=[scratch]", *overrides(words)])
    except ConfigError as error:
        print(f"learnability.py: error: {error}", file=sys.stderr)
        return 2
    figures = {}
    for words in args.words:
        data = overrides(words)
        try:
            config = load_config("local", overrides=["strategies=[scratch]", "train.eval_points=1", *data])
            meta_path = prepare_data(config, cache)
            corpus_tokens = load_meta(meta_path)["splits"]["train"]["num_tokens"]
            config = load_config("local", overrides=["strategies=[scratch]", "train.eval_points=1",
                                                     f"unique_tokens={corpus_tokens}", *data])
        except ConfigError as error:
            print(f"learnability.py: error: {error}", file=sys.stderr)
            return 2
        summary, _ = pretrain_cell(config, cache_dir=cache)
        entropy = unigram_entropy(meta_path)
        figures[words] = {"unigram_entropy": entropy, "mlm_val_loss": summary["mlm_val_loss"],
                          "gap": entropy - summary["mlm_val_loss"], "steps": summary["steps"],
                          "tokens": summary["tokens"], "epochs": summary["epochs"],
                          "device_seconds": summary["device_seconds"], "vocab": load_meta(meta_path)["vocab_size"]}
        f = figures[words]
        print(f"{words:>5} words (vocabulary {f['vocab']}): {f['steps']} steps, {f['tokens']:,} tokens "
              f"({f['epochs']:.1f} passes), {f['device_seconds']:.0f} s: unigram entropy {entropy:.3f}, "
              f"MLM validation loss {f['mlm_val_loss']:.3f} nats ({f['gap']:.3f} below)", flush=True)
    print(json.dumps({"figures": {str(k): v for k, v in figures.items()}, "preset_words": preset_words,
                      "preset_gap_at_least_1": (figures[preset_words]["gap"] >= REQUIRED_GAP
                                                if preset_words in figures else None)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
