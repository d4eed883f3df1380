"""One pretraining trial (one grid cell, no Tune, no GLUE), printing its budget ledger.

    python sweeps/pretrain.py --preset smoke --strategy tinybert
    python sweeps/pretrain.py --preset local --strategy vanilla_kd --budget 5e11 --repetition 2

Runs the preset's stages (corpus, teacher; cached) and one Ray Train trial,
then prints the ledger in every unit and checks the stop rule of SPEC §3:
spent <= budget and budget - spent < the charge of the step that was refused.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from raykd.config import ConfigError, add_study_arguments, check_strategy_pairs, load_arguments  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(parser, default_preset="smoke")
    parser.add_argument("--strategy", default="scratch")
    parser.add_argument("--budget", type=float, help="default: the preset's first budget")
    parser.add_argument("--repetition", type=float, help="default: the preset's first repetition")
    args = parser.parse_args(argv)
    try:  # every check that needs no corpus, before torch, transformers and Ray are imported
        overrides = [f"strategies=[{args.strategy}]", *args.overrides]
        if args.budget is not None:
            overrides.append(f"budgets=[{args.budget!r}]")
        if args.repetition is not None:
            overrides.append(f"repetitions=[{args.repetition!r}]")
        config, _ = load_arguments(args, overrides)
        check_strategy_pairs(config)  # imports torch: after every cheaper check
    except ConfigError as error:
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        return 2
    from raykd.recipes import pretrain_cell

    try:
        summary, step_charge = pretrain_cell(config, cache_dir=args.cache_dir)
    except ConfigError as error:  # what needs the corpus, e.g. the exact charge of one step
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        return 2
    ledger = {k: summary[k] for k in ("flops", "teacher_flops", "tokens", "device_seconds", "steps",
                                      "unique_tokens", "epochs", "mlm_val_loss")}
    budget = config.budgets[0]
    spent = ledger[config.budget_unit]
    print(json.dumps(ledger, indent=1))
    refused_charge = step_charge if config.budget_unit != "device_seconds" else float("nan")
    print(f"budget {budget:.6g} {config.budget_unit}: spent {spent:.6g}, left {budget - spent:.6g}, "
          f"next step's charge {refused_charge:.6g} -> stop rule "
          f"{'holds' if spent <= budget and budget - spent < refused_charge else 'VIOLATED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
