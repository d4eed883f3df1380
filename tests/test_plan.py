"""The grid's cells and the typed trial they become: names, and a spec that crosses to Ray workers as it is."""
import math
import pickle

from raykd.config import load_config
from raykd.plan import Cell, control_cells, with_tuned_lr
from raykd.ray_train import Corpus, TrialSpec


def test_cells_name_themselves_by_their_axes():
    assert Cell("tinybert", 3e10, 2.0, 0).trial_id == "tinybert-b3e+10-r2-s0"
    assert Cell("teacher", 1e11, math.nan, 1).trial_id == "teacher-s1"
    assert Cell("scratch", 3e10, 1.0, 4).labels() == {"trial_id": "scratch-b3e+10-r1-s4", "strategy": "scratch",
                                                      "budget": 3e10, "repetition": 1.0, "seed": 4}


def test_a_cell_takes_its_tuned_lr_else_the_config_s():
    tuned = {"minilm": {"3e+10": 2e-3}}
    assert with_tuned_lr(Cell("minilm", 3e10, 1.0, 0), tuned, "lr.json", 1e-3).lr == 2e-3
    assert with_tuned_lr(Cell("minilm", 3e10, 1.0, 0), tuned, "lr.json", 1e-3).lr_source == "tuned:lr.json"
    assert with_tuned_lr(Cell("scratch", 3e10, 1.0, 0), tuned, "lr.json", 1e-3).lr_source == "config:train.lr"


def test_a_trial_spec_is_the_config_and_the_cell_and_pickles_as_it_is():
    config = load_config("smoke")
    cell = Cell("vanilla_kd", config.budgets[0], config.repetitions[0], config.seeds[0], unique_examples=40, lr=1e-3)
    spec = TrialSpec(config, cell, Corpus("/storage/stages/data-x/meta.json", 2048, 64), teacher_dir="/t/model")
    copy = pickle.loads(pickle.dumps(spec))
    assert copy == spec and copy.config.student == config.student and copy.cell.strategy == "vanilla_kd"
    assert spec.devices() == config.train.workers + (config.teacher.actors if config.teacher.placement == "actor" else 0)


def test_controls_are_cells_without_a_pool():
    cells = control_cells(load_config("smoke"))
    assert {cell.strategy for cell in cells} == {"random_init", "teacher"}
    assert all(cell.unique_examples == 0 and cell.lr_source == "control" for cell in cells)
