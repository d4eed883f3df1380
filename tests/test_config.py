"""Every bad configuration fails at the door with a message naming the field."""
import pytest

from raykd.config import ConfigError, load_config


@pytest.mark.parametrize("preset", ["smoke", "local", "paper"])
def test_presets_are_valid(preset):
    config = load_config(preset)
    assert config.name == preset


def test_file_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("budgets: [1.0e10]\nteacher: {placement: colocated}\n")
    config = load_config("smoke", path, ["budgets=[2e10, 3e10]", "train.lr=1e-3", "strategy_options.alpha=0.25"])
    assert config.budgets == [2e10, 3e10]
    assert config.teacher.placement == "colocated"
    assert config.train.lr == 1e-3 and config.strategy_options["alpha"] == 0.25
    assert config.student.hidden == 64  # untouched preset value


@pytest.mark.parametrize("overrides,field", [
    (["strategies=[scratch, distil]"], "strategies"),
    (["budgets=[0]"], "budgets"),
    (["budgets=[-5e10]"], "budgets"),
    (["budget_unit=hours"], "budget_unit"),
    (["teacher.budget_unit=joules"], "teacher.budget_unit"),
    (["repetitions=[0.5]"], "repetitions"),
    (["strategy_options.relation_heads=3"], "strategy_options.relation_heads"),
    (["strategy_options.teacher_layer=7"], "strategy_options.teacher_layer"),
    (["strategy_options.layer_map=[1, 5]"], "strategy_options.layer_map"),
    (["strategy_options.layer_map=[1]"], "strategy_options.layer_map"),
    (["teacher.shape.heads=4"], "teacher.shape.heads"),
    (["teacher.shape={layers: 1, hidden: 128, heads: 2, intermediate: 512}"], "teacher.shape.layers"),
    (["student.heads=3"], "student.heads"),
    (["student.layers=0"], "student.layers"),
    (["teacher.placement=remote"], "teacher.placement"),
    (["teacher.dtype=int8"], "teacher.dtype"),
    (["teacher.pretrain_threads=0"], "teacher.pretrain_threads"),
    (["strategy_options.alpha=1.5"], "strategy_options.alpha"),
    (["strategy_options.temperature=0"], "strategy_options.temperature"),
    (["strategy_options.relaton_heads=2"], "strategy_options.relaton_heads"),
    (["strategy_options.relation_heads=two"], "strategy_options.relation_heads"),
    (["data.source=web"], "data.source"),
    (["data.source=files", "data.data_files=[/no/such/corpus.txt]"], "data.data_files"),
    (["data.source=hub"], "data.dataset_name"),
    (["data.mask_prob=0"], "data.mask_prob"),
    (["data.num_words=299"], "data.num_words"),
    (["data.num_words=many"], "data.num_words"),
    (["train.per_worker_batch=0"], "train.per_worker_batch"),
    (["train.lr=0"], "train.lr"),
    (["train.precision=fp8"], "train.precision"),
    (["train.compile=maybe"], "train.compile"),
    (["train.calibration_steps=3"], "train.calibration_steps"),
    (["train.tokens_per_device_second=0"], "train.tokens_per_device_second"),
    (["train.lr_file=/no/such/lrs.json"], "train.lr_file"),
    (["eval.tasks=[syn_cola, squad]"], "eval.tasks"),
    (["eval.data_dir=/no/such/glue"], "eval.data_dir"),
    (["eval.epochs=0"], "eval.epochs"),
    (["unique_tokens=3"], "unique_tokens"),
    (["seeds=[]"], "seeds"),
    (["colour=blue"], "colour"),
    (["train.speed=3"], "train.speed"),
    (["budgets=[lots]"], "budgets"),
    (["train.workers=two"], "train.workers"),
])
def test_bad_field_is_named(overrides, field):
    with pytest.raises(ConfigError) as error:
        load_config("smoke", overrides=overrides)
    assert str(error.value).startswith(f"{field}:"), str(error.value)
    assert error.value.field == field


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="^config: file not found: .*nope.yaml"):
        load_config("smoke", tmp_path / "nope.yaml")


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match="^preset:"):
        load_config("huge")


def test_controls_are_known_names_once_each_or_none():
    assert load_config("smoke").controls == ["random_init", "teacher"]
    assert load_config("smoke", overrides=["controls=[]"]).controls == []
    for bad in ("controls=[nobody]", "controls=[teacher, teacher]"):
        with pytest.raises(ConfigError, match="^controls:"):
            load_config("smoke", overrides=[bad])
