"""A run's life: its folder, lock and status, its checkpoints, its processes and DDP children, its callbacks,
and the one-line reporting of bad input on every entry point's command line.

- `folder`: which run folder `ckpt_path=last` continues, who may write into it, when it is finished. Its
  functions are this package's own (`runs.claim(out)`, `runs.run_dir`): what `tunelab.train`, compression
  and the config resolvers call.
- `checkpoints`: checkpoints that keep the resume promise (`RunCheckpoint`, `ResumeState`, atomic writes).
- `processes`: whether a process still runs, so leftovers of killed ones are told from live work.
- `distributed`: subprocess DDP under Hydra, in single runs and sweeps; children die with their parent.
- `callbacks`: callbacks the configs name that Lightning does not ship as-is (`Throughput`).
- `cli`: bad input on the command line: one `error: ...` line and exit code 2.

Importing the package loads `folder` alone (standard library only); the other modules are imported by name
where they are used.
"""

from tunelab.runs.folder import (
    LOCK,
    abandon,
    claim,
    finish,
    is_primary_process,
    output_subdir,
    point_latest,
    release,
    run_dir,
    write_atomic,
)

__all__ = ["LOCK", "abandon", "claim", "finish", "is_primary_process", "output_subdir", "point_latest", "release",
           "run_dir", "write_atomic"]
