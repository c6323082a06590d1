"""The compression config: `conf/compress.yaml`, its groups in `conf/compress/`, and `data=` from `conf/data/`.

The groups live in their own folder so they never mix with training's; that folder joins Hydra's search
path through `hydra.searchpath` (the entry point adds it to the command line, `compose` to its overrides).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, open_dict

from tunelab.config import CONF_DIR, register_resolvers

SEARCHPATH = f"hydra.searchpath=[file://{CONF_DIR / 'compress'}]"


def compose(overrides: list[str], output_dir: str | Path, log_dir: str | Path) -> DictConfig:
    """The config `python compress.py <overrides>` would see, run in `output_dir` (tests, benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("compress", overrides=[SEARCHPATH, *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.paths.root_dir, cfg.paths.output_dir, cfg.paths.log_dir = str(CONF_DIR.parent), str(output_dir), str(log_dir)
    return cfg
