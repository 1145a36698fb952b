"""The sweep's Tuner: a new one (the searcher, ASHA, the budget, the progress callback)
or the experiment's, restored; the searcher is Optuna's over the space, or for long runs
the chosen configs."""

from __future__ import annotations

import functools
import os
import warnings

from sweep import long_runs, storage, study
from sweep.cluster import concurrency
from sweep.config import MAX_FAILURES, SweepConfig, first_rung, long_run_configs, objective
from sweep.experiment import keep_tuner, save_settings
from sweep.progress import make_progress
from sweep.space import space, start_points
from sweep.train import default_recipe


def name_trial_dir(trial) -> str:
    from sweep.trainable import trial_dir_name  # where trials look for their checkpoints

    return trial_dir_name(trial.trial_id)


def build_tuner(c: SweepConfig):
    """The sweep's Tuner: restored from the experiment if there is one, else a new one."""
    # Snapshot the experiment every 2 s (Tune's default: 10 s or more). A killed driver
    # resumes from the last snapshot; trials also pick up newer checkpoints from disk.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # ... and, at that rate, without Tune's warning that snapshots come often.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own console output off (its experiment table, and a TensorBoard path into
    # Ray's temp folder): our progress lines say what happens and where the results are.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune

    from sweep.trainable import tune_trial

    # GPUs only where Ray has some (real, or logical ones declared with --gpus).
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    resources = {"cpu": c.cpus_per_trial, "gpu": c.gpus_per_trial if has_gpus else 0}
    trainable = tune.with_resources(
        tune.with_parameters(tune_trial, experiment=c.experiment_uri), resources)
    if tune.Tuner.can_restore(c.experiment_uri):
        print(f"resuming the sweep in {c.experiment_uri}")
        # The search space, the Optuna study, the trial count and the run config (the
        # progress callback too) come back from the experiment's tuner.pkl; finished trials
        # are kept, interrupted ones continue from their checkpoints.
        return tune.Tuner.restore(c.experiment_uri, trainable, resume_errored=True)
    return new_tuner(c, trainable)


def new_tuner(c: SweepConfig, trainable):
    """A new sweep's Tuner (the search, ASHA, the budget, the progress callback), and its
    settings file, which a resume is checked against (check_same_sweep)."""
    from ray import tune

    n_concurrent = concurrency(c)
    search, scheduler, param_space = (long_run_search(c) if c.from_experiment
                                      else optuna_search(c))
    tune_config = tune.TuneConfig(
        search_alg=search, scheduler=scheduler, num_samples=c.trials,
        # (Tune lifts Optuna's one pending trial by it; a list of configs needs no limit)
        max_concurrent_trials=None if c.from_experiment else n_concurrent,
        time_budget_s=c.time_budget,
        # A worker goes on to the next trial: no new process, torch import or data load.
        reuse_actors=True, trial_dirname_creator=name_trial_dir)
    run_config = tune.RunConfig(
        name=c.name,
        storage_path=storage.normalize(c.storage),  # Tune writes to object storage itself
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),  # a worker died
        callbacks=[make_progress(c)],
        verbose=0,
    )
    save_settings(c)
    print(f"new sweep in {c.experiment_uri}: {c.trials} trials, up to {n_concurrent} at once")
    tuner = tune.Tuner(trainable, tune_config=tune_config, run_config=run_config,
                       param_space=param_space)
    keep_tuner(c.experiment_uri)  # tuner.pkl is whole now: its copy mends a later cut
    return tuner


def optuna_search(c: SweepConfig):
    """Optuna's search over the space, its study in real storage; ASHA (or FIFO); the
    space is Optuna's (define-by-run), so Tune's param_space is empty."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler

    from sweep.study_search import StudySearch

    # The recipe is written into each trial's config: a sweep resumed after the defaults
    # move goes on with the recipe it began with.
    constants = {"epochs": c.max_epochs, "samples_per_epoch": c.samples_per_epoch,
                 "val_pairs": c.val_pairs, "test_pairs": c.test_pairs, "seed": c.seed,
                 **default_recipe()}
    define_by_run = functools.partial(space, constants=constants)
    max_params = c.max_params or None
    if c.search == "random":  # the baseline the search-efficiency bench compares with
        # Suggestions over the budget are refused (StudySearch): uniform over those within.
        sampler = optuna.samplers.RandomSampler(seed=c.seed)
    else:
        # Few random start-up trials: in parallel they are overrun anyway (ray #52535).
        # multivariate: learning rate, batch size and width interact; constant_liar: trials
        # still running count as bad guesses, so parallel suggestions spread out. Points over
        # --max-params, refused unrun, carry a constraint (StudySearch) that TPE ranks below
        # every feasible point.
        sampler = optuna.samplers.TPESampler(seed=c.seed, multivariate=True, constant_liar=True,
                                             n_startup_trials=max(2, min(5, c.trials // 4)))
    # Metric and mode go on the searcher and the scheduler, not on TuneConfig: with the
    # concurrency limit Tune wraps the searcher and would not pass them on. The study is
    # in real storage, named after the experiment, for optuna-dashboard.
    search = StudySearch(define_by_run, sampler=sampler, **objective(c),
                         max_params=max_params,
                         points_to_evaluate=(start_points(max_params)
                                             if c.warm_start else None),
                         study_name=c.name, storage=study.open_storage(study.url_of(c)),
                         own_file=not c.study_storage)
    scheduler = None  # FIFO: every trial runs all its epochs
    if c.early_stop:
        # A rung whose trials all ended in error or divergence holds only NaN: ASHA's
        # cutoff (numpy's nanpercentile) then warns, and there is nothing to cut.
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        # The trial's own epoch, not Tune's count of its results: after a killed driver
        # that count restarts from Tune's last snapshot while the trial goes on from its
        # newest checkpoint on disk.
        scheduler = ASHAScheduler(metric="val_mse", mode="min", time_attr="epoch",
                                  max_t=c.max_epochs, reduction_factor=2,
                                  grace_period=first_rung(c.samples_per_epoch, c.max_epochs,
                                                          c.first_rung_samples))
    return search, scheduler, {}


def long_run_search(c: SweepConfig):
    """The chosen configs, one trial each, every one run to its end: no search, FIFO.
    Tune takes a trial's config from its point only for keys its param_space names."""
    from ray.tune.search import BasicVariantGenerator

    configs = long_run_configs(c)
    what = (f"{c.from_experiment}, extended" if c.extend
            else f"the design of {c.from_experiment}"
            if long_runs.is_checkpoint(c.from_experiment)
            else f"{len(configs)} configs of {c.from_experiment}'s front")
    print(f"long runs of {what}, {c.samples:,} samples each")
    keys = dict.fromkeys(k for config in configs for k in config)
    return BasicVariantGenerator(points_to_evaluate=configs), None, keys
