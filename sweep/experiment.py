"""The experiment on disk: the driver's lock on it, the settings it began with (a resume
must ask for the same), the trials' final states, --fresh's move aside, and, before a
resume, the disk reconciled with Ray Tune's last snapshot of it.

Tune snapshots the experiment every 2 s (tuner.py): every trial's state in
experiment_state-<timestamp>.json, the search generator's count of the trials it made in
search_gen_state-<timestamp>.json. Trials write their checkpoints straight into the
experiment, at once. So a driver killed between two snapshots can leave trial directories
the last snapshot does not know: Tune would never look at them, and the search generator,
its count restored from the snapshot, would make new trials in their place.

The disk is the truth for what ended (trainable.newest_good_checkpoint treats it so for
every trial). Before Tune restores the experiment, each trial directory the snapshot does
not know is either
- adopted, if its newest checkpoint ended the trial (finished or diverged): added to the
  snapshot as an ended (TERMINATED) trial, its config and last result from that
  checkpoint, and counted by the search generator, so that it is reported once and never
  trained again, and no trial is made in its place; or
- moved to lost/ in the experiment, whole, if it never ended: the resumed sweep makes
  another trial in its place (its Optuna trial is marked FAIL, sweep/study_search.py).

Tune writes tuner.pkl, what a resume starts from, as the new sweep's Tuner is built; a
resumed Tune copies it back into the experiment, in place, with every snapshot. A driver
killed during either write leaves it cut short, and Tune's resume would end in a
traceback: a copy kept beside it, which Tune never touches, puts it back (mend_tuner).
"""

from __future__ import annotations

import fcntl
import json
import os
import pickletools
import time
from dataclasses import dataclass, field
from pathlib import Path

from sweep import storage
from sweep.config import SETTINGS_FILE, SweepConfig, UsageError, sweep_settings

LOST_DIR = "lost"  # in the experiment: trial directories a resumed sweep does not know
ENDED = ("finished", "diverged")  # a trial's own status once its last checkpoint is saved
STATE_FILES = "experiment_state-*.json"  # Tune's snapshots of the trials, one per driver
COUNT_FILES = "search_gen_state-*.json"  # the search generator's, beside each (a pickle)
# All that Tune reads back on a resume, each kind the newest of its name: the searcher's
# (Optuna's, or the basic variant generator's for --from) and the callbacks' too
SNAPSHOT_FILES = (STATE_FILES, COUNT_FILES, "basic-variant-state-*.json",
                  "searcher-state-*.pkl", "callback-states-*.pkl")
TUNER_FILE = "tuner.pkl"  # Tune's pickled Tuner: what a resume starts from
# Its copy, under a name Tune leaves alone (it copies *.pkl and *.json back with snapshots)
KEPT_TUNER_FILE = "tuner.pkl.kept"


class StateError(Exception):
    """A snapshot file Tune cannot read: one line naming it and the fix; exit code 2."""


@dataclass
class Reconciled:
    adopted: dict[str, dict] = field(default_factory=dict)  # trial id -> its last result
    lost: list[str] = field(default_factory=list)  # trial directories moved to lost/


def reconcile(experiment: str) -> Reconciled:
    """Adopt the trials that ended after the last snapshot, set aside those that never
    ended, and make the search generator's count match the trials the snapshot holds.
    Each step can be cut short by a kill: the same command finishes it."""
    from ray import cloudpickle  # Tune's pickler for the generator's file

    found = Reconciled()
    states = storage.names(experiment, STATE_FILES)
    if not states:  # killed before Tune's first snapshot: nothing to restore from
        return found
    state_file = storage.join(experiment, states[-1])  # the newest, as Tune picks it
    snapshot = read_snapshot(experiment, state_file, STATE_FILES, json.loads)
    known = {json.loads(trial)["trial_id"] for trial, _ in snapshot["trial_data"]}
    counted = [storage.join(experiment, n) for n in storage.names(experiment, COUNT_FILES)]
    # Long runs have no search generator: Tune makes all their trials at its first step.
    count = read_snapshot(experiment, counted[-1], COUNT_FILES,
                          cloudpickle.loads) if counted else None
    unknown = [n for n in storage.names(experiment, "trial_*")
               if n.removeprefix("trial_") not in known]
    for name in unknown:
        ended = ended_trial(storage.join(experiment, name))
        if ended is not None and count is not None and snapshot["trial_data"]:
            found.adopted[name.removeprefix("trial_")] = ended[1]
            snapshot["trial_data"].append(adopted_state(snapshot, name, *ended))
            print(f"{name} ended ({ended[1]['status']}) after the driver's last snapshot, "
                  "then the driver was killed: kept as it ended, not trained again")
        else:
            to = storage.join(experiment, LOST_DIR, name)
            storage.move(storage.join(experiment, name), to)
            found.lost.append(name)
            print(f"{name} started after the driver's last snapshot, then the driver was "
                  f"killed, and never ended; the resumed sweep does not know it: moved to {to}")
    if found.adopted:
        storage.write_bytes(state_file, json.dumps(snapshot).encode())
    if count is not None and count["counter"] < len(snapshot["trial_data"]):
        # The generator made each trial the snapshot holds: so many are made already.
        count["counter"] = len(snapshot["trial_data"])
        storage.write_bytes(counted[-1], cloudpickle.dumps(count))
    return found


def keep_tuner(experiment: str) -> None:
    """Keep a copy of a whole tuner.pkl, once: it never changes after the Tuner is built."""
    kept = storage.join(experiment, KEPT_TUNER_FILE)
    if not storage.exists(kept):
        storage.write_bytes(kept, storage.read_bytes(storage.join(experiment, TUNER_FILE)))


def mend_tuner(experiment: str) -> None:
    """Before a resume: a cut-short tuner.pkl put back from its kept copy; without one, and
    without a snapshot (killed while the Tuner was built, before any trial), removed, so
    that the same command begins the sweep anew. A whole one is kept, if it is not yet."""
    location = storage.join(experiment, TUNER_FILE)
    try:
        data = storage.read_bytes(location)
    except FileNotFoundError:
        return
    if is_whole_pickle(data):
        keep_tuner(experiment)
        return
    kept = storage.join(experiment, KEPT_TUNER_FILE)
    if storage.exists(kept):
        storage.write_bytes(location, storage.read_bytes(kept))
        print(f"{location} was cut short by a kill: put back from {KEPT_TUNER_FILE}")
    elif not storage.names(experiment, STATE_FILES):
        storage.remove(location)
        print(f"{location} was cut short by a kill before the sweep began: beginning it anew")
    else:
        raise StateError(f"{location} is cut short or damaged and has no kept copy; the "
                         "sweep cannot resume from it: start over with --fresh")


def is_whole_pickle(data: bytes) -> bool:
    """Whether `data` is a pickle to its STOP opcode, read without running any of it."""
    try:
        for _ in pickletools.genops(data):
            pass
    except ValueError:  # "pickle exhausted before seeing STOP", "not enough data ..."
        return False
    return bool(data)


def set_aside_cut_snapshots(experiment: str) -> list[str]:
    """Before a resume: a newest snapshot with a file cut short (a driver killed while Tune
    wrote it) moved, all its files (Tune names them by their driver's start time), to
    lost/snapshot-<time>/, so that Tune resumes from the snapshot before, which reconcile()
    then squares with the disk. Returns the moved snapshots' times."""
    moved = []
    while cut := newest_cut_snapshot_file(experiment):
        location, pattern = cut
        stamp = storage.snapshot_stamp(location, pattern)
        aside = storage.join(experiment, LOST_DIR, f"snapshot-{stamp}")
        for name in storage.names(experiment, f"*-{stamp}.*"):
            storage.write_bytes(storage.join(aside, name),
                                storage.read_bytes(storage.join(experiment, name)))
            storage.remove(storage.join(experiment, name))
        moved.append(stamp)
        print(f"{location} was cut short by a kill: that snapshot's files moved to {aside}; "
              "resuming from the one before")
    return moved


def newest_cut_snapshot_file(experiment: str) -> tuple[str, str] | None:
    """(location, pattern) of the first of Tune's newest snapshot files, one per kind, that
    is not whole; None when all are. Checked without running any of their pickles."""
    for pattern in SNAPSHOT_FILES:
        if names := storage.names(experiment, pattern):
            location = storage.join(experiment, names[-1])
            if not is_whole_snapshot_file(names[-1], storage.read_bytes(location)):
                return location, pattern
    return None


def is_whole_snapshot_file(name: str, data: bytes) -> bool:
    """Whether a snapshot file is whole: the experiment's state is JSON, the rest pickles."""
    if not name.startswith(STATE_FILES.partition("*")[0]):
        return is_whole_pickle(data)
    try:
        json.loads(data)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False
    return True


def read_snapshot(experiment: str, location: str, pattern: str, parse):
    """A snapshot file, parsed; a StateError if it is cut short or damaged (a driver killed
    while Tune copied it into the experiment), which Tune would end in a traceback."""
    try:
        return parse(storage.read_bytes(location))
    except Exception as e:  # noqa: BLE001 - json's, pickle's and the classes' own errors
        raise StateError(storage.damaged_snapshot(location, pattern, experiment, e)) from None


def ended_trial(trial_uri: str) -> tuple[dict, dict] | None:
    """(config, last result) of a trial whose newest checkpoint ended it, else None."""
    from sweep.trainable import newest_good_checkpoint

    state, path, _ = newest_good_checkpoint(storage.download(trial_uri, "checkpoint_*"))
    if state is None or state["metrics"].get("status") not in ENDED:
        return None
    config = {**state["model_config"], **state["train_config"]}
    # The file the report names, as trainable.py names it for a trial re-reported from disk.
    stored = storage.join(trial_uri, path.parent.name, path.name)
    return config, {**state["metrics"], "checkpoint_file": stored}


def adopted_state(snapshot: dict, name: str, config: dict, result: dict) -> list[str]:
    """A snapshot entry (trial state, run metadata) for an ended trial the snapshot does not
    know: a trial like the snapshot's first (the trainable, resources, storage, failure
    and checkpoint settings are the sweep's), with its own id, directory, config and last
    result, ended."""
    from ray.tune.experiment import Trial

    template = Trial.from_json_state(snapshot["trial_data"][0][0], stub=True)
    trial = Trial(template.trainable_name, trial_id=name.removeprefix("trial_"), stub=True,
                  # the config's fields as the sweep's trials have them (the checkpoint
                  # keeps every field of the model and training configs)
                  config={k: config[k] for k in template.config if k in config},
                  storage=template.storage, experiment_tag=str(len(snapshot["trial_data"]) + 1),
                  stopping_criterion=template.stopping_criterion,
                  checkpoint_config=template.run_metadata.checkpoint_manager.checkpoint_config,
                  trial_dirname_creator=template.trial_dirname_creator,
                  max_failures=template.max_failures, log_to_file=template.log_to_file)
    trial.evaluated_params = dict(trial.config)
    # Resolved as the template's was: Tune computes it again from the trainable's resources.
    trial.placement_group_factory = template.placement_group_factory
    trial.relative_logdir = trial.storage.trial_dir_name = name
    trial.run_metadata.last_result = result
    trial.status = Trial.TERMINATED
    trial.stub = False  # saved so: the resumed Tune loads it as one of its trials
    return list(trial.get_json_state())


def tell_study(url: str, name: str, metric: str | list[str], adopted: dict[str, dict]) -> None:
    """An adopted trial whose end the killed driver never told the study (the kill fell
    between the trial's last checkpoint and its end reaching the driver) is told now, as
    the searcher would have told it; one told already stays as it is."""
    import optuna

    from sweep.stored_study import open_storage, outcome

    store = open_storage(url)
    try:
        stored = optuna.load_study(study_name=name, storage=store)
        for trial in stored.get_trials(deepcopy=False,
                                       states=(optuna.trial.TrialState.RUNNING,)):
            result = adopted.get(trial.user_attrs.get("trial_id"))
            if result is not None:
                state, values = outcome(result, metric, error=False)
                stored._storage.set_trial_user_attr(trial._trial_id, "status",
                                                    result["status"])
                stored.tell(trial.number, values, state=state)
    finally:
        store.engine.dispose()


def save_settings(c: SweepConfig) -> None:
    """A new sweep's settings, in the experiment: what check_same_sweep holds a resume to."""
    settings = json.dumps(sweep_settings(c), indent=1).encode()
    storage.write_bytes(storage.join(c.experiment_uri, SETTINGS_FILE), settings)


def check_same_sweep(c: SweepConfig) -> None:
    """Tune resumes a sweep with the settings it began with (kept in its tuner.pkl: trial
    count, budget, search, the live report's path) and would quietly ignore new ones; the
    trials would see some of them. Refuse a command that asks for others."""
    try:
        saved = json.loads(storage.read_bytes(storage.join(c.experiment_uri, SETTINGS_FILE)))
    except (OSError, ValueError):  # a new sweep, or one begun before the file was kept
        return
    wanted = sweep_settings(c)
    differ = [k for k in wanted if saved.get(k, wanted[k]) != wanted[k]]
    if differ:
        changes = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (asked: {wanted[k]})"
                            for k in differ)
        raise UsageError(f"{c.experiment_uri} is a sweep begun with {changes}; its own command "
                         "continues it, --fresh or another --name starts a new one")


def lock_experiment(experiment: Path):
    """Hold an exclusive lock for this driver's lifetime: a second driver on the same
    experiment would corrupt it. The OS drops the lock when the process dies, however.
    The lock file sits beside the experiment, not in it, so that `--fresh` can move the
    experiment aside under the lock."""
    experiment.parent.mkdir(parents=True, exist_ok=True)
    handle = open(experiment.with_name(f".{experiment.name}.driver.lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        raise UsageError(f"another sweep is running on {experiment} (driver pid {owner}); "
                         "wait for it, or use another --name") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def save_final_states(experiment: str, trials) -> None:
    """Write the driver's final trial states over stale ones in the saved experiment.

    Ray 2.60 does not snapshot a trial whose worker died for the last time: its state
    stays RUNNING on disk (TuneController._schedule_trial_stop sets it ERROR but returns,
    its actor gone, before marking the trial for the next snapshot), and report.py or a
    resume would read it as unfinished.
    """
    states = storage.names(experiment, STATE_FILES)
    if not states:
        return
    newest = storage.join(experiment, states[-1])
    saved = json.loads(storage.read_bytes(newest))
    live = {t.trial_id: t for t in trials}
    changed = False
    for i, (state, _) in enumerate(saved["trial_data"]):
        state = json.loads(state)
        trial = live.get(state["trial_id"])
        if trial is not None and state["status"] != trial.status:
            trial.invalidate_json_state()
            saved["trial_data"][i] = list(trial.get_json_state())
            changed = True
    if changed:
        storage.write_bytes(newest, json.dumps(saved).encode())


def move_aside(experiment: str, name: str) -> str:
    aside = storage.sibling(experiment, f"{name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    storage.move(experiment, aside)
    return aside
