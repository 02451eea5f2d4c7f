"""Time-budgeted training: the plan's arithmetic, a schedule fitted to it, a resume that keeps
it, and a real run that ends inside its budget."""

import dataclasses
import functools
import json
import logging
import time

import pytest

from helpers import SMOKE, event_scalars
from ranet import config as config_lib
from ranet.training import budget, train_and_evaluate
from ranet.training import controller as controller_lib
from ranet.training.controller import format_duration
from ranet.training.optimizer import learning_rate_schedule


def test_steps_that_fit_by_hand():
    # From step 10 at 1 s per step, an evaluation (5 s) every 20 steps and a checkpoint (1 s)
    # every 30, the final ones included. Reaching N costs:
    #   N = 79: 69 + 5 x 4 (20, 40, 60, 79) + 3 (30, 60, 79) = 92 s
    #   N = 80: 70 + 5 x 4 (20, 40, 60, 80) + 3 (30, 60, 80) = 93 s
    #   N = 82: 72 + 5 x 5 (20, 40, 60, 80, 82) + 3 (30, 60, 82) = 100 s
    #   N = 83: 101 s
    assert budget.steps_that_fit(100, 10, 1.0, 5.0, 20, 1.0, 30) == 82
    assert budget.steps_that_fit(93, 10, 1.0, 5.0, 20, 1.0, 30) == 80
    assert budget.steps_that_fit(92.9, 10, 1.0, 5.0, 20, 1.0, 30) == 79
    assert budget.steps_that_fit(5, 10, 1.0, 5.0, 20, 1.0, 30) == 10  # not one step fits


def test_the_plan_keeps_a_reserve_and_refuses_a_budget_too_small():
    plan = budget.plan(1000, elapsed_seconds=100, step=50, seconds_per_step=0.5, eval_seconds=0,
                       eval_every=10 ** 6, save_seconds=0, save_every=10 ** 6,
                       steps_per_epoch=100)
    assert plan.total_steps == 50 + int((1000 * (1 - budget.RESERVE_SHARE) - 100) / 0.5)
    assert plan.epochs == pytest.approx(plan.total_steps / 100)
    with pytest.raises(ValueError, match="leaves no time to train.*Give a longer budget"):
        budget.plan(10, elapsed_seconds=12, step=5, seconds_per_step=0.5, eval_seconds=1,
                    eval_every=10, save_seconds=1, save_every=10, steps_per_epoch=10)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "multistep"])
def test_the_schedule_is_fitted_to_the_planned_steps_and_ends_at_zero(schedule):
    optim = config_lib.OptimConfig(time_budget="1h", schedule=schedule, warmup_epochs=1.0,
                                   learning_rate=0.1, decay_rate=0.1)
    unplanned = config_lib.plan_steps(optim, config_lib.RuntimeConfig(), steps_per_epoch=10)
    rates = learning_rate_schedule(optim, unplanned)
    assert float(rates(5)) == pytest.approx(0.05)     # warm-up, whatever the plan
    assert float(rates(100)) == pytest.approx(0.1)    # before the plan: the peak
    rates.set_plan(config_lib.plan_steps(optim, config_lib.RuntimeConfig(), 10, total_steps=210))
    assert float(rates(10)) == pytest.approx(0.1)
    last = {"cosine": 0.0, "linear": 0.0, "multistep": 0.1 * 0.1 ** 2}[schedule]
    assert float(rates(210)) == pytest.approx(last, abs=1e-7)
    if schedule == "linear":
        assert float(rates(110)) == pytest.approx(0.05)  # half-way from the end of warm-up


def test_durations_show_days():
    assert format_duration(3 * 3600 + 62) == "03:01:02"
    assert format_duration(50 * 3600 + 7) == "2d 02:00:07"


def test_refit_shortens_lengthens_or_keeps_the_plan_by_hand():
    plan = budget.BudgetPlan(budget_seconds=100.0, planned_at_step=10, planned_after_seconds=3.0,
                             seconds_per_step=0.5, eval_seconds=2.0, save_seconds=1.0,
                             total_steps=200, steps_per_epoch=50)
    refit = functools.partial(budget.refit, plan, step=50, schedule="linear")
    # 97 s usable (3% reserve); 50 s gone at 1 step/s: 47 more steps fit, not 150.
    assert refit(planned_steps=200, elapsed_seconds=50, seconds_per_step=1.0) == 97
    # 77 s left at 4 steps/s: the final evaluation and checkpoint (3 s) set aside once more.
    assert refit(planned_steps=100, elapsed_seconds=20, seconds_per_step=0.25) == 50 + 296
    # 101 steps would fit: not more than 2% longer than the plan, which stays.
    assert refit(planned_steps=100, elapsed_seconds=43, seconds_per_step=1.0) == 100
    # A multistep plan grows no further than keeps its passed decay (at 50% of 150) passed.
    assert budget.refit(plan, step=100, planned_steps=150, elapsed_seconds=20,
                        seconds_per_step=0.1, schedule="multistep",
                        decay_fractions=(0.5, 0.75)) == 199


def test_the_plan_file_round_trips_and_a_bad_one_says_how_to_fix_it(tmp_path):
    assert budget.load(str(tmp_path)) is None
    plan = budget.BudgetPlan(budget_seconds=60.0, planned_at_step=20, planned_after_seconds=4.0,
                             seconds_per_step=0.25, eval_seconds=1.5, save_seconds=0.1,
                             total_steps=200, steps_per_epoch=50)
    budget.save(str(tmp_path), plan)
    assert budget.load(str(tmp_path)) == plan and plan.epochs == 4.0
    (tmp_path / budget.PLAN_FILENAME).write_text('{"total_steps": 3}')
    with pytest.raises(ValueError, match="is not a budget plan.*Delete it to plan the budget"):
        budget.load(str(tmp_path))


def _budgeted(model_dir, budget_text, **runtime):
    return dataclasses.replace(
        SMOKE, optim=dataclasses.replace(SMOKE.optim, train_steps=None, time_budget=budget_text,
                                         schedule="cosine"),
        runtime=config_lib.RuntimeConfig(model_dir=str(model_dir), log_every_steps=20,
                                         **runtime))


@pytest.mark.slow  # real time budgets of 20-45 s
def test_a_budgeted_run_ends_inside_its_budget_and_a_resume_keeps_the_plan(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    first = train_and_evaluate(_budgeted(tmp_path, "20s", stop_at_step=60))
    plan = json.loads((tmp_path / budget.PLAN_FILENAME).read_text())
    assert first["step"] == 60 < plan["total_steps"]
    assert f"~{plan['total_steps']} steps" in caplog.text
    caplog.clear()
    # Resumed with another budget: the plan, and so the schedule, stay as they were.
    result = train_and_evaluate(_budgeted(tmp_path, "45s"))
    assert result["step"] == plan["total_steps"]
    assert "resuming the plan" in caplog.text and "keeps that plan" in caplog.text
    assert json.loads((tmp_path / budget.PLAN_FILENAME).read_text()) == plan
    rates = event_scalars(tmp_path)["learning_rate"]
    assert rates[max(rates)] == pytest.approx(0.0, abs=1e-7)  # cosine, at its last step


def _eta_seconds(message: str) -> int:
    hours, minutes, seconds = map(int, message.rsplit("ETA ", 1)[1].split(":"))
    return hours * 3600 + minutes * 60 + seconds


@pytest.mark.slow  # real time budgets of 20-45 s
def test_a_budgeted_run_stops_inside_the_budget(tmp_path):
    started = time.monotonic()
    result = train_and_evaluate(_budgeted(tmp_path, "25s"))
    elapsed = time.monotonic() - started
    plan = json.loads((tmp_path / budget.PLAN_FILENAME).read_text())
    assert result["step"] == plan["total_steps"] > plan["planned_at_step"]
    # The plan fits the budget from what was measured; other tests on the same cores can
    # slow the run after that (the plan only changes at log lines), hence the margin.
    assert plan["planned_after_seconds"] < 25 and elapsed <= 25 * 1.25, elapsed


def test_a_longer_multistep_plan_keeps_the_decays_it_has_passed():
    # At step 100 of 150, decays at 0.5 and 0.75 of the plan: the first (step 75) is passed,
    # and stays so while int(0.5 T) < 100, up to T = 199; the second (112) is ahead.
    assert budget.longest_plan_keeping_decays(100, 150, (0.5, 0.75)) == 199
    assert int(0.5 * 199) < 100 <= int(0.5 * 200)
    # Nothing passed yet (or no decays): any length.
    assert budget.longest_plan_keeping_decays(50, 150, (0.5, 0.75)) > 10 ** 9
    assert budget.longest_plan_keeping_decays(50, 150, ()) > 10 ** 9
    # Both passed: the later fraction binds (ceil(130 / 0.75) - 1 = 173).
    assert budget.longest_plan_keeping_decays(130, 150, (0.5, 0.75)) == 173


def _first_plan(caplog) -> int:
    planned = [r.getMessage() for r in caplog.records if "time budget: ~" in r.getMessage()]
    return int(planned[0].split("~", 1)[1].split(" ", 1)[0])


def _slowed(monkeypatch, *, before_plan: bool, seconds_per_step: float):
    """Makes every step slower before the plan is made (``before_plan``), or after it."""
    advance = controller_lib.Controller._advance

    def slow_advance(self, iterator, num_steps):
        if (self._planned is None) == before_plan:
            time.sleep(seconds_per_step * num_steps)
        advance(self, iterator, num_steps)

    monkeypatch.setattr(controller_lib.Controller, "_advance", slow_advance)


@pytest.mark.slow  # real time budgets of 20-45 s
@pytest.mark.parametrize("slow_before_plan, change", [(False, "slowed"), (True, "sped up")])
def test_the_plan_follows_the_pace_and_the_run_still_ends_inside_the_budget(
        tmp_path, caplog, monkeypatch, slow_before_plan, change):
    # A machine that slows down after the plan (another job starts), or that was slow while
    # the probe timed it and then speeds up: the plan gets shorter or longer, and the
    # schedule ends at zero on the new last step.
    caplog.set_level(logging.INFO, logger="absl")
    _slowed(monkeypatch, before_plan=slow_before_plan, seconds_per_step=0.05)
    started = time.monotonic()
    result = train_and_evaluate(_budgeted(tmp_path, "25s"))
    elapsed = time.monotonic() - started
    first = _first_plan(caplog)
    plan = json.loads((tmp_path / budget.PLAN_FILENAME).read_text())
    assert f"the run {change} to" in caplog.text
    assert result["step"] == plan["total_steps"]
    assert plan["total_steps"] < first if change == "slowed" else plan["total_steps"] > first
    assert elapsed <= 25 * 1.25, elapsed  # the margin of the tests above
    rates = event_scalars(tmp_path)["learning_rate"]
    assert rates[max(rates)] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.slow  # real time budgets of 20-45 s
def test_the_eta_after_the_plan_is_timed_from_the_plan(tmp_path, caplog):
    # Evaluations (a large validation split) dwarf the steps; the probe runs two of them, the
    # first one traced, and no other comes before the last step. Timed from the first step,
    # the ETA would count them in the rate of every step to come.
    caplog.set_level(logging.INFO, logger="absl")
    config = _budgeted(tmp_path, "40s", eval_every_epochs=10 ** 4)
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, synthetic_train_size=4096, validation_size=2048))
    wall_started = time.time()
    train_and_evaluate(config)
    planned = [i for i, r in enumerate(caplog.records) if "time budget: ~" in r.getMessage()]
    progress = [r for r in caplog.records[planned[0]:] if "ETA " in r.getMessage()]
    assert len(progress) > 3
    for record in progress:
        # The margin of the test above: other tests on the same cores slow the run.
        assert record.created + _eta_seconds(record.getMessage()) <= wall_started + 40 * 1.25, \
            (record.created - wall_started, record.getMessage())


def test_a_run_without_a_budget_does_not_speak_of_one(tmp_path, caplog):
    # Its first compiled call runs a whole log interval, so the first line has no rate yet.
    caplog.set_level(logging.INFO, logger="absl")
    train_and_evaluate(dataclasses.replace(SMOKE, runtime=config_lib.RuntimeConfig(
        model_dir=str(tmp_path), log_every_steps=5)))
    lines = [r.getMessage() for r in caplog.records if "ETA " in r.getMessage()]
    assert len(lines) == SMOKE.optim.train_steps // 5
    assert lines[0].endswith("ETA ?") and lines[-1].endswith("ETA 00:00:00")
    assert not any("budget" in line for line in lines), lines


@pytest.mark.slow  # real time budgets of 20-45 s
def test_the_probe_plans_without_waiting_for_a_boundary(tmp_path):
    # Logs, checkpoints and evaluations far beyond what 20 s hold: the probe must plan after
    # its own time, not at the first of them (before, this run never planned: it trained
    # until stop_at_step with the schedule's placeholder length).
    config = _budgeted(tmp_path, "20s", stop_at_step=2000)
    config = dataclasses.replace(config, runtime=dataclasses.replace(
        config.runtime, log_every_steps=10 ** 6, checkpoint_every_steps=10 ** 6,
        eval_every_epochs=10 ** 4))
    result = train_and_evaluate(config)
    plan = json.loads((tmp_path / budget.PLAN_FILENAME).read_text())
    assert 0 < plan["planned_at_step"] < plan["total_steps"]
    assert plan["planned_after_seconds"] < 20
    assert result["step"] == min(plan["total_steps"], 2000)
