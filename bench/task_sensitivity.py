"""Which embedded tasks can show what pretraining taught? Every task against a finished study's own models.

Fine-tunes the students of a finished study (its results.parquet), its teacher and `random_init`
(the student at each seed's initial weights) on the embedded tasks you name - by default all five,
also those the study left out - with the study's own fine-tuning protocol and seeds, and prints per
task and row the mean ± 95 % CI over seeds against the task's chance level. A task on which no
pretrained student is above chance cannot show pretraining at this scale (the `local` preset
evaluates only the tasks that can; issue 11).

    python bench/task_sensitivity.py runs/local                     # all five embedded tasks, ~5 min
    python bench/task_sensitivity.py runs/local --tasks syn_nli syn_sts
"""
import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raykd.config import ConfigError, StudyConfig, check_locations, from_dict, validate  # noqa: E402
from raykd.task_specs import TASKS  # noqa: E402

EMBEDDED = [task for task, spec in TASKS.items() if spec.embedded]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a finished study folder (results.parquet, study.json)")
    parser.add_argument("--tasks", nargs="+", default=EMBEDDED, help=f"embedded tasks (default: {' '.join(EMBEDDED)})")
    parser.add_argument("--cache-dir", help="where the study's corpus is cached (default: $RAYKD_CACHE or ~/.cache/raykd)")
    args = parser.parse_args()
    try:  # everything checked before any corpus, task or fine-tuning
        config, results = _study(Path(args.study), args.tasks, args.cache_dir)
    except ConfigError as error:
        print(f"task_sensitivity.py: error: {error}", file=sys.stderr)
        return 2

    import pandas as pd

    from raykd import storage as store
    from raykd.analysis import above_chance, format_above_chance
    from raykd.data.meta import load_meta
    from raykd.models import build_masked_lm
    from raykd.evaluation import evaluate_student
    from raykd.recipes import chance_levels
    from raykd.stages import default_cache_dir, prepare_data, prepare_tasks
    from raykd.trainables import finetuning_options

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    meta_path = prepare_data(config, cache)
    meta = load_meta(meta_path)
    tokenizer = str(Path(meta_path).parent / meta["tokenizer"])
    tasks_dir = prepare_tasks(config, cache)  # the study's tasks, and the ones it left out, cached alike
    chance = chance_levels(config, tasks_dir)
    options = finetuning_options(config)
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="raykd-random-init-") as scratch:
        for row in results.itertuples():
            if row.strategy == "random_init":  # the study keeps no weights for it: the same seed rebuilds them
                checkpoint = Path(scratch) / f"seed-{row.seed}"
                build_masked_lm(config.student, meta["vocab_size"], meta["seq_len"], seed=int(row.seed),
                                dropout=config.train.dropout).save_pretrained(checkpoint)
            else:
                checkpoint = row.checkpoint
            with store.local_folder(checkpoint) as local:
                scores = evaluate_student(local, tokenizer, args.tasks, data_dir=str(tasks_dir), seed=int(row.seed),
                                          **options)["scores"]
            rows.append({"strategy": row.strategy, "budget_unit": row.budget_unit, "budget": row.budget,
                         "repetition": row.repetition, "seed": row.seed, **scores})
            print(f"{row.strategy:>12} seed {row.seed}: "
                  + "  ".join(f"{task} {score:.1f}" for task, score in scores.items()), flush=True)
    table = above_chance(pd.DataFrame(rows), chance)
    print()
    print(format_above_chance(table))
    students = table[~table["strategy"].isin(["random_init", "teacher"])]

    def verdicts(strategy: str) -> dict:
        return {task: bool(frame["above"].any()) for task, frame in table[table["strategy"] == strategy].groupby("task")}

    print(json.dumps({"study": args.study, "seconds": round(time.time() - started, 1), "chance": chance,
                      "students_above_chance": {task: int(f["above"].sum()) for task, f in students.groupby("task")},
                      "students": int(students.groupby("task").size().max()),
                      "teacher_above_chance": verdicts("teacher"), "random_init_above_chance": verdicts("random_init")}))
    return 0


def _study(folder: Path, tasks: list[str], cache_dir: str | None):
    """The study's configuration (its eval.tasks replaced by `tasks`) and results; ConfigError naming the
    argument or file that is wrong, a student checkpoint that is gone included."""
    import pandas as pd

    from raykd import storage as store

    check_locations(cache_dir=cache_dir)
    unknown = [task for task in tasks if task not in EMBEDDED]
    if unknown:
        raise ConfigError("--tasks", f"{', '.join(unknown)}: not embedded tasks; known: {', '.join(EMBEDDED)}")
    for name in ("study.json", "results.parquet"):
        if not (folder / name).is_file():
            raise ConfigError("study", f"{folder / name} not found: pass a finished study folder")
    try:
        config = from_dict(StudyConfig, json.loads((folder / "study.json").read_text())["config"])
    except (ValueError, KeyError) as error:
        raise ConfigError("study", f"{folder / 'study.json'} is not a study's record: {error}") from None
    if config.data.source != "synthetic":
        raise ConfigError("study", f"{folder}: its corpus is not the embedded language, so it has no embedded tasks")
    config = replace(config, eval=replace(config.eval, tasks=list(dict.fromkeys(tasks))))
    validate(config)
    results = pd.read_parquet(folder / "results.parquet")
    for row in results.itertuples():
        if row.strategy != "random_init" and not store.is_file(store.join(row.checkpoint, "config.json")):
            raise ConfigError("study", f"{row.trial_id}: its student {row.checkpoint} is gone (no config.json)")
    return config, results


if __name__ == "__main__":
    sys.exit(main())
