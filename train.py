"""Entry point: `python train.py task=finetune data=reviews trainer=cpu` (see README)."""

import sys

import hydra
from omegaconf import DictConfig

from tunelab.distributed import isolated_job
from tunelab.errors import TunelabError
from tunelab.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        with isolated_job():
            return run(cfg)
    except TunelabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
