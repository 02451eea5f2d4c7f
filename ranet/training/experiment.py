"""``train_and_evaluate(config)``: the whole training job, callable from tests without flags.

It assembles the pieces: the set-up (``setup``), the model directory and its checkpoints
(``model_dir``), what workers must agree on (``distribute``), SIGTERM (``preemption``) and the
loop that decides when to log, evaluate, save and stop (``controller``).
"""

import functools
import os
import time
from typing import Callable

import tensorflow as tf
from absl import logging

from ranet import config as config_lib
from ranet.training import budget, distribute, model_dir, setup
from ranet.training.controller import Controller
from ranet.training.preemption import WORKER_LOST_EXIT_CODE, PreemptionWatcher, WorkerLost


def train_and_evaluate(config: config_lib.ExperimentConfig, flags_text: str = "", *,
                       clock: Callable[[], float] = time.monotonic) -> dict:
    """Trains (or resumes) the experiment in ``config.runtime.model_dir``.

    ``flags_text``, the resolved flags of the binary, is saved beside the
    config. Returns the last training-window metrics and validation metrics. ``clock``
    (seconds) times a time budget and the log lines; tests pass a fake one.

    Stops: raises ``Preempted`` (exit status 143) after SIGTERM, once every worker saved a
    checkpoint at the same step; ``WorkerLost`` (144) when another worker of a multi-worker
    run dies or hangs past --collective_timeout_seconds; ``DivergedError`` at the first
    step whose loss is not finite (except under mixed_float16, whose loss scaling skips such
    steps), before anything is saved after it. Running the same command again resumes from
    the chief's latest readable checkpoint.
    """
    config_lib.require(bool(config.runtime.model_dir),
                       "model_dir is required: pass --model_dir=/path/to/run")
    started_at = clock()  # where a time budget starts
    strategy = setup.create_strategy(config.runtime)
    # Created outside strategy.scope(): one local flag per worker.
    watcher = PreemptionWatcher()
    workdir, controller = None, None
    try:
        with watcher:
            workdir = model_dir.WorkerDirectory(config.runtime.model_dir,
                                                distribute.is_chief(strategy),
                                                task=distribute.task_name(strategy))
            controller = _prepare(config, flags_text, strategy, watcher, workdir, started_at,
                                  clock)
            return controller.run()
    except distribute.PEER_ERRORS as error:
        if distribute.num_workers(strategy) == 1:
            raise
        raise _worker_lost(error, None if controller is None else controller.step,
                           config) from error
    finally:
        if workdir is not None:
            workdir.cleanup()


def _prepare(config: config_lib.ExperimentConfig, flags_text: str, strategy, watcher,
             workdir: model_dir.WorkerDirectory, started_at: float,
             clock: Callable[[], float]) -> Controller:
    """Checks, builds and restores everything the loop needs; returns its controller."""
    runtime, chief = config.runtime, workdir.chief
    setup.check(config, strategy)
    if chief:
        model_dir.check_model_dir(config)
    if runtime.init_from:
        model_dir.check_init_from(config)
    logging.info("runtime: %s", distribute.describe(strategy, runtime))
    training = setup.build(config, strategy, stop_request=watcher.flag)
    model, optimizer, steps = training.model, training.optimizer, training.steps

    # Every worker resumes from the chief's checkpoints; each saves into its own folder.
    chief_checkpoints = os.path.join(runtime.model_dir, model_dir.CHECKPOINT_SUBDIR)
    with strategy.scope():
        checkpoint = tf.train.Checkpoint(**model_dir.trackables(model, optimizer),
                                         global_step=steps.global_step)
        manager = tf.train.CheckpointManager(
            checkpoint, os.path.join(workdir.path, model_dir.CHECKPOINT_SUBDIR),
            max_to_keep=runtime.keep_checkpoints, step_counter=steps.global_step)
        model_dir.check_free_space(workdir.path, model.variables + optimizer.variables,
                                   runtime.keep_checkpoints)
        if chief:
            model_dir.remove_partial_saves(chief_checkpoints)
            model_dir.remove_partial_saves(os.path.join(runtime.model_dir, model_dir.BEST_SUBDIR))
        restored = model_dir.restore_newest_readable(checkpoint, chief_checkpoints)
        if restored:
            logging.info("resumed from %s", restored)
        elif runtime.init_from:
            logging.info("started from the weights of %s (--init_from); optimizer, step and "
                         "schedule start fresh", model_dir.initialize_from(model, config))
        best = model_dir.BestCheckpoint(
            checkpoint, os.path.join(workdir.path, model_dir.BEST_SUBDIR),
            record_dir=os.path.join(runtime.model_dir, model_dir.BEST_SUBDIR))
    step = int(steps.global_step.numpy())
    if distribute.num_workers(strategy) > 1:
        distribute.check_workers_agree(strategy, config, step)
    if chief:
        model_dir.write_config(config, flags_text)

    def writer(subdir):
        return (tf.summary.create_file_writer(os.path.join(runtime.model_dir, subdir)) if chief
                else tf.summary.create_noop_writer())

    time_budget = None
    if config.optim.time_budget is not None:
        # Every worker reads the chief's plan: a resumed run keeps its schedule.
        budget_plan = budget.load(runtime.model_dir)
        if budget_plan is None:
            agree = (functools.partial(distribute.broadcast_from_chief, strategy)
                     if distribute.num_workers(strategy) > 1 else None)
            time_budget = budget.TimeBudget(
                config.optim, runtime, training.plan, started_at=started_at,
                evaluates=len(training.splits.validation) > 0, agree=agree)
            logging.info("%s: %g s of training to plan (--time_budget=%s), starting at %d",
                         config.model.name, config.optim.time_budget_seconds,
                         config.optim.time_budget, step)
        else:
            if budget_plan.budget_seconds != config.optim.time_budget_seconds:
                logging.warning("--time_budget=%s, but the run was planned for %g s: it keeps "
                                "that plan (%s)", config.optim.time_budget,
                                budget_plan.budget_seconds, budget.PLAN_FILENAME)
            training.set_total_steps(budget_plan.total_steps)
            logging.info("time budget: resuming the plan %s", budget_plan.describe())
    plan = training.plan
    if time_budget is None:
        logging.info("%s: %d steps (%d per epoch, global batch %d over %d replicas), starting "
                     "at %d", config.model.name, plan.total_steps, plan.steps_per_epoch,
                     config.optim.batch_size, strategy.num_replicas_in_sync, step)
    return Controller(training, manager, best, chief=chief,
                      train_writer=writer(model_dir.TRAIN_EVENTS),
                      eval_writer=writer(model_dir.VALIDATION_EVENTS),
                      time_budget=time_budget, clock=clock)


def _worker_lost(error: tf.errors.OpError, step, config: config_lib.ExperimentConfig) -> WorkerLost:
    where = f"after step {step}" if step is not None else "before training"
    summary = distribute.peer_error_summary(error)
    if isinstance(error, tf.errors.DeadlineExceededError) or "timed out" in summary:
        what = (f"a collective waited more than --collective_timeout_seconds="
                f"{config.runtime.collective_timeout_seconds:g} for another worker {where} "
                "(is one stuck, or started with other flags?)")
    else:
        what = f"lost contact with another worker {where}"
    message = (f"{what}: {summary} Check the other workers' logs for the first failure, then "
               "relaunch every worker with the same command: training resumes from the "
               "chief's latest checkpoint in "
               f"{os.path.join(config.runtime.model_dir, model_dir.CHECKPOINT_SUBDIR)}. Exiting "
               f"with status {WORKER_LOST_EXIT_CODE}.")
    logging.error("%s", message)
    return WorkerLost(message, step)
