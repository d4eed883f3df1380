"""device_seconds budgets: the measured rate, the pools it sizes, and where the rate comes from."""
import json

import pytest

import raykd.calibration
from raykd import plan, recipes
from raykd.calibration import rate_from_curve
from raykd.config import ConfigError, load_config
from raykd.data.stream import unique_examples_for

META = {"seq_len": 64, "vocab_size": 2048, "splits": {"train": {"num_examples": 1_000_000}}}


def device_seconds_config(*overrides):
    return load_config("smoke", overrides=["budget_unit=device_seconds", "budgets=[20, 40]", *overrides])


def test_the_rate_leaves_out_the_warmup_steps():
    # 1024 tokens per step; the first 5 steps take 1 s each (warm-up), the rest 0.25 s.
    curve, seconds = [], 0.0
    for step in range(1, 13):
        seconds += 1.0 if step <= 5 else 0.25
        curve.append({"step": step, "tokens": 1024 * step, "device_seconds": seconds})
    curve.append({**curve[-1], "final": True})
    rate = rate_from_curve(curve, warmup_steps=5)
    assert rate["tokens_per_device_second"] == pytest.approx(4096.0)
    assert rate["steps"] == 7 and rate["tokens"] == 7 * 1024 and rate["seconds"] == pytest.approx(1.75)
    with pytest.raises(RuntimeError, match="calibration ran 4 steps"):
        rate_from_curve(curve[:4], warmup_steps=5)


def test_device_seconds_pools_are_sized_from_the_rate():
    config = device_seconds_config()
    tokens_per_step = config.train.per_worker_batch * config.train.workers * META["seq_len"]  # 1024
    assert plan.scratch_tokens(config, 20, META, 1000.0) == (20 * 1000 // tokens_per_step) * tokens_per_step
    cells = plan.plan_cells(config, META, 1000.0)
    big = [c for c in cells if c.budget == 40][0]
    assert big.scratch_tokens == (40 * 1000 // tokens_per_step) * tokens_per_step
    assert big.unique_examples == unique_examples_for(big.scratch_tokens, config.repetitions[0], META["seq_len"])


def test_a_device_seconds_pool_without_a_rate_is_refused_by_name():
    with pytest.raises(ConfigError) as error:
        plan.plan_cells(device_seconds_config(), META)
    assert error.value.field == "train.tokens_per_device_second"


def test_the_rate_is_an_override_else_this_study_s_record_else_a_measurement(tmp_path, monkeypatch):
    measured = []

    def fake_measurement(*args, **kwargs):
        measured.append(kwargs["name"])
        return {"tokens_per_device_second": 1234.0, "source": "measured"}

    monkeypatch.setattr(raykd.calibration, "measure_tokens_per_device_second", fake_measurement)
    monkeypatch.setattr(recipes, "start_ray", lambda config: None)
    assert recipes.calibration(load_config("smoke"), tmp_path / "meta.json", META, "storage", "k", tmp_path) is None
    override = recipes.calibration(device_seconds_config("train.tokens_per_device_second=5e4"), tmp_path / "meta.json",
                                 META, "storage", "k", tmp_path)
    assert override == {"tokens_per_device_second": 5e4, "source": "config:train.tokens_per_device_second"}
    assert not measured
    config = device_seconds_config()
    (tmp_path / recipes.STUDY_FILE).write_text(json.dumps({"key": "k", "calibration": {"tokens_per_device_second": 99.0}}))
    assert recipes.calibration(config, tmp_path / "meta.json", META, "storage", "k", tmp_path) == {"tokens_per_device_second": 99.0}
    assert not measured  # a resumed study keeps the rate its pools were sized with
    fresh = recipes.calibration(config, tmp_path / "meta.json", META, "storage", "another-key", tmp_path)
    assert fresh["tokens_per_device_second"] == 1234.0 and len(measured) == 1
