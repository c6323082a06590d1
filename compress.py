"""Entry point: `python compress.py source=logs/finetune/latest prune=heads_ffn recover=distill` (see README).

Bad input (a source that is no model folder, a value out of range, an unknown option) is one `error: ...`
line and exit code 2, reported as `train.py` reports it; the source folder is only ever read.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tunelab.compress.config import SEARCHPATH
from tunelab.errors import TunelabError
from tunelab.runs import abandon
from tunelab.runs.cli import report_bad_input


@hydra.main(version_base="1.3", config_path="conf", config_name="compress")
def main(cfg: DictConfig) -> None:
    from tunelab.compress.run import run

    try:
        run(cfg)
    except TunelabError as e:
        abandon(Path(cfg.paths.output_dir))  # a failed start leaves no run folder behind
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from tunelab.config import register_resolvers

    register_resolvers()
    report_bad_input(main.__wrapped__)
    sys.argv.insert(1, SEARCHPATH)  # conf/compress/: the prune, recover, quantize and export groups
    main()
