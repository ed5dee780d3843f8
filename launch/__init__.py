"""Launchers: local multi-process (`launch.local`), Cloud TPU pods (`launch.tpu`), SLURM
GPU clusters (`launch.slurm`). Run them from the repository root: `python -m launch.tpu ...`.
"""

from __future__ import annotations

import argparse
import sys

# What every launcher runs on each host: joins the job (near_jax.train.distributed), then trains.
TRAIN_MODULE = "launch._worker"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def split_train_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """`[launcher flags] -- [train flags]` -> (launcher flags, train flags)."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


class LaunchError(ValueError):
    """A launch that cannot work (bad flags or a mesh that does not fit); one line."""


def load_train_config(train_args: list[str]):
    """The ConfigDict that `near_jax.train` would build from these flags (no JAX import).

    Reads --config=FILE[:ARG] and applies --config.SECTION.KEY=VALUE overrides, converting
    each value to the type of the field it replaces.
    """
    import importlib.util
    import os

    spec = [a.split("=", 1)[1] for a in train_args if a.startswith("--config=")]
    if not spec:
        raise LaunchError("the train flags after -- need --config=FILE[:ARG]")
    path, _, arg = spec[-1].partition(":")
    if not os.path.isfile(path):
        raise LaunchError(f"--config={spec[-1]}: no such file {path!r}")
    module_spec = importlib.util.spec_from_file_location("near_jax_launch_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        cfg = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001 - any failure of the config file is one line
        raise LaunchError(f"--config={spec[-1]} failed: {e}") from None
    for a in train_args:
        if not a.startswith("--config.") or "=" not in a:
            continue
        key, value = a[len("--config.") :].split("=", 1)
        *parents, leaf = key.split(".")
        node = cfg
        try:
            for p in parents:
                node = node[p]
            old = node[leaf]
        except (KeyError, AttributeError):
            raise LaunchError(f"--config.{key}: unknown config key") from None
        node[leaf] = _convert(key, value, old)
    return cfg


def _convert(key: str, value: str, old):
    if isinstance(old, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise LaunchError(f"--config.{key}={value}: expected true or false")
        return value.lower() in ("true", "1")
    try:
        return type(old)(value)
    except ValueError:
        raise LaunchError(f"--config.{key}={value}: expected {type(old).__name__}") from None


def check_mesh(cfg, devices_per_slice: int, slices: int, where: str) -> None:
    """Fails unless the mesh's data*fsdp*tensor fills `devices_per_slice` and dcn_data fits."""
    sizes = {k: cfg.mesh[k] for k in ("data", "fsdp", "tensor")}
    shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
    fixed = 1
    for v in sizes.values():
        fixed *= v if v != -1 else 1
    fill = -1 in sizes.values()
    if (fill and devices_per_slice % fixed) or (not fill and fixed != devices_per_slice):
        raise LaunchError(
            f"mesh ({shown}) does not fit {where}: data*fsdp*tensor must "
            f"{'divide' if fill else 'equal'} its {devices_per_slice} devices per slice"
        )
    if cfg.mesh.dcn_data != slices:
        raise LaunchError(
            f"config.mesh.dcn_data={cfg.mesh.dcn_data} does not match {slices} slice(s) of {where}"
        )
