"""Entry point: `python predict.py model=logs/finetune/latest input=test.jsonl output=predictions.jsonl`.

Bad input (a config Hydra cannot compose, a model, input or output the run cannot use) is one `error: ...`
line and exit code 2, through the same reporting as `train.py`.
"""

import sys

import hydra
from omegaconf import DictConfig

from tunelab.errors import TunelabError
from tunelab.runs.cli import report_bad_input


@hydra.main(version_base="1.3", config_path="conf/deploy", config_name="predict")
def main(cfg: DictConfig) -> None:
    from tunelab.deploy.predict import run, summary_line

    try:
        print(summary_line(run(cfg)))
    except TunelabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    report_bad_input(main.__wrapped__)
    main()
