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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raykd.config import ConfigError, StudyConfig, from_dict, validate  # noqa: E402
from raykd.task_specs import TASKS  # noqa: E402

EMBEDDED = [task for task, spec in TASKS.items() if spec.embedded]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a finished study folder (results.parquet, study.json)")
    parser.add_argument("--tasks", nargs="+", default=EMBEDDED, help=f"embedded tasks (default: {' '.join(EMBEDDED)})")
    parser.add_argument("--cache-dir", help="where the study's corpus is cached (default: $RAYKD_CACHE or ~/.cache/raykd)")
    args = parser.parse_args()
    folder = Path(args.study)
    try:  # everything checked before any fine-tuning
        for name in ("study.json", "results.parquet"):
            if not (folder / name).is_file():
                raise ConfigError("study", f"{folder / name} not found: pass a finished study folder")
        unknown = [task for task in args.tasks if task not in EMBEDDED]
        if unknown:
            raise ConfigError("--tasks", f"{', '.join(unknown)} not embedded tasks; known: {', '.join(EMBEDDED)}")
        study = json.loads((folder / "study.json").read_text())
        config = from_dict(StudyConfig, study["config"])
        validate(config)
        if config.data.source != "synthetic":
            raise ConfigError("study", "the study's corpus is not the embedded language: its tasks are not embedded")
    except ConfigError as error:
        print(f"task_sensitivity.py: error: {error}", file=sys.stderr)
        return 2

    import pandas as pd

    from raykd import storage as store
    from raykd.analysis import above_chance, format_above_chance
    from raykd.data.meta import load_meta
    from raykd.data.tasks import write_tasks
    from raykd.evaluation import chance_score, evaluate_student
    from raykd.models import build_masked_lm
    from raykd.stages import default_cache_dir, prepare_data

    results = pd.read_parquet(folder / "results.parquet")
    meta_path = prepare_data(config, Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    meta = load_meta(meta_path)
    tokenizer = str(Path(meta_path).parent / meta["tokenizer"])
    evaluation = config.eval
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="raykd-tasks-") as scratch:
        tasks_dir = Path(scratch) / "tasks"
        write_tasks(tasks_dir, seed=config.data.seed, train_size=evaluation.train_examples,
                    validation_size=evaluation.validation_examples, tasks=args.tasks, num_words=config.data.num_words)
        chance = {task: chance_score(task, str(tasks_dir), max_eval_examples=evaluation.validation_examples,
                                     seed=config.seeds[0]) for task in args.tasks}
        options = dict(data_dir=str(tasks_dir), learning_rates=evaluation.learning_rates,
                       batch_sizes=evaluation.batch_sizes, epochs=evaluation.epochs, max_seq_len=evaluation.max_seq_len,
                       max_train_examples=evaluation.train_examples, max_eval_examples=evaluation.validation_examples,
                       num_threads=config.train.num_threads, precision=config.train.precision)
        for row in results.itertuples():
            if row.strategy == "random_init":
                student = Path(scratch) / f"random_init-{row.seed}"
                build_masked_lm(config.student, meta["vocab_size"], meta["seq_len"], seed=int(row.seed),
                                dropout=config.train.dropout).save_pretrained(student)
                checkpoint = str(student)
            else:
                checkpoint = row.checkpoint
            with store.local_folder(checkpoint) as local:
                scores = evaluate_student(local, tokenizer, args.tasks, seed=int(row.seed), **options)["scores"]
            rows.append({"strategy": row.strategy, "budget_unit": row.budget_unit, "budget": row.budget,
                         "repetition": row.repetition, "seed": row.seed, **scores})
            print(f"{row.strategy:>12} seed {row.seed}: "
                  + "  ".join(f"{task} {score:.1f}" for task, score in scores.items()), flush=True)
    table = above_chance(pd.DataFrame(rows), chance)
    print()
    print(format_above_chance(table))
    students = table[~table["strategy"].isin(["random_init", "teacher"])]
    figures = {"study": str(folder), "seconds": round(time.time() - started, 1), "chance": chance,
               "students_above_chance": {task: int(frame["above"].sum()) for task, frame in students.groupby("task")},
               "students": int(students.groupby("task").size().max()),
               "teacher_above_chance": {task: bool(frame["above"].any()) for task, frame in
                                        table[table["strategy"] == "teacher"].groupby("task")},
               "random_init_above_chance": {task: bool(frame["above"].any()) for task, frame in
                                            table[table["strategy"] == "random_init"].groupby("task")}}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
