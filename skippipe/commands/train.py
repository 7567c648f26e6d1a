"""``skippipe train [CONFIG] [key=value ...]``: train with the configured launcher."""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="a YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=20")


def split_config_and_overrides(args) -> tuple:
    """argparse cannot tell `train a=1` (no config) from `train cfg.yaml`: an argument with '=' is an
    override."""
    from skippipe.config import split_config_arg

    return split_config_arg(([args.config] if args.config else []) + list(args.overrides))


def run(args) -> int:
    from skippipe.config import load_config

    config, overrides = split_config_and_overrides(args)
    cfg = load_config(config, overrides)
    logging.getLogger().setLevel(cfg.run.log_level.upper())  # the coordinator's (workers log warnings)
    if cfg.launcher != "ray":  # Ray workers may have GPUs that this machine lacks
        from skippipe.process import check_device

        check_device(cfg)
    from skippipe.runtime.rundir import check_run_dir

    check_run_dir(cfg)  # before any worker starts; the coordinator validates the rest before writing
    if cfg.launcher == "inprocess":
        from skippipe.runtime.coordinator import train_inprocess

        train_inprocess(cfg)
        return 0
    if cfg.launcher == "local":
        from skippipe.runtime.launch_local import train_local

        train_local(cfg)
        return 0
    from skippipe.runtime.launch_ray import train_ray

    train_ray(cfg)
    return 0
