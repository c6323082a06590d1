"""An Optuna sweeper whose on-disk study resumes where an interrupted search stopped.

hydra-optuna-sweeper already reloads a study from its `storage`, but then runs `n_trials` more.
Here `n_trials` is the size of the whole search: a restarted search runs only the trials still
missing, and the sampler sees every finished one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger(__name__)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def finished_trials(storage: str | None, study_name: str | None) -> int:
    """Trials of the stored study that ran to the end (0 when there is no stored study yet)."""
    if not storage or not study_name:
        return 0
    if storage.startswith("sqlite:///"):  # SQLite creates the file, not its folder
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return 0
    return sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))


class ResumableOptunaSweeper(OptunaSweeper):
    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        done = finished_trials(impl.storage, impl.study_name)
        remaining = max(0, impl.n_trials - done)
        log.info("study %s: %d of %d trials finished, %d to run", impl.study_name, done, impl.n_trials, remaining)
        if remaining == 0:
            return None
        impl.n_trials = remaining
        if done:  # a seeded sampler would otherwise propose the first trials again
            impl.sampler.reseed_rng()
        return super().sweep(arguments)
