"""Entry point: `python serve.py model=logs/finetune/latest` (see README, "Serve").

Bad input (a config Hydra cannot compose, a model the server cannot serve) is one `error: ...` line and exit
code 2 before anything listens, through the same reporting as `train.py`.
"""

import sys

import hydra
from omegaconf import DictConfig

from tunelab.errors import TunelabError


@hydra.main(version_base="1.3", config_path="conf/deploy", config_name="serve")
def main(cfg: DictConfig) -> None:
    from tunelab.deploy.server import run

    try:
        code = run(cfg)
    except TunelabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":  # (inference workers are spawned: they import this file, and need none of train.py)
    from tunelab.runs.cli import report_bad_input

    report_bad_input(main.__wrapped__)
    main()
