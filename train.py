"""Entry point: `python train.py task=finetune data=reviews trainer=cpu` (see README).

Bad input (a config Hydra cannot compose, a value the run cannot use) is one `error: ...` line and exit
code 2 (`tunelab.runs.cli`).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tunelab.errors import TunelabError
from tunelab.runs import abandon
from tunelab.runs.cli import report_bad_input
from tunelab.runs.distributed import isolated_job
from tunelab.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        with isolated_job():
            return run(cfg)
    except TunelabError as e:
        abandon(Path(cfg.paths.output_dir))  # a failed start leaves no empty run folder behind
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from tunelab.config import register_resolvers

    register_resolvers()  # before Hydra composes: the config names ${run_dir:...}, ${output_subdir:...}
    report_bad_input(main.__wrapped__)
    main()
