"""Command-line plumbing shared by every near_jax program: one-line usage errors (exit 2),
absl flag parsing that keeps them one line, and quieter library logs.
"""

from __future__ import annotations

import logging as std_logging
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from near_jax._io import one_line


def usage_error(message: str) -> None:
    """Prints one line for a command-line mistake and exits with status 2."""
    print(f"{_program_name()}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _program_name() -> str:
    """The running program's file name; for a package run with -m (`python -m near_jax.train`
    runs near_jax/train/__main__.py) the package's, as it was when it was one module."""
    name = os.path.basename(sys.argv[0])
    if name == "__main__.py":
        name = os.path.basename(os.path.dirname(os.path.abspath(sys.argv[0]))) + ".py"
    return name or "near_jax"


class _ConfigFileParser(flags.ArgumentParser):
    """ml_collections' config file parser, but every failure to load is one ValueError line.

    ml_collections defers a missing file to the first access (the error then names a module,
    not the path), lets a SyntaxError out as a traceback and folds get_config's errors into a
    multi-line traceback text; absl prefixes a ValueError with `flag --config=PATH:`.
    """

    def __init__(self, inner: flags.ArgumentParser):
        self._inner = inner

    def flag_type(self) -> str:
        return self._inner.flag_type()

    def parse(self, argument: Any) -> Any:
        if not isinstance(argument, str):
            return self._inner.parse(argument)
        path = argument.split(":", 1)[0]
        if not os.path.isfile(path):
            raise ValueError("no such file" if not os.path.exists(path) else "not a file")
        try:
            config = self._inner.parse(argument)
            if not isinstance(config, ml_collections.ConfigDict):
                config.keys()  # a deferred load error (ml_collections' _ErrorConfig) raises here
        except SyntaxError as e:  # also one in a module the config file imports
            raise ValueError(f"syntax error in {e.filename}, line {e.lineno}: {e.msg}") from None
        except Exception as e:  # noqa: BLE001 - anything get_config raises is a usage error
            if str(e).startswith("Error whilst parsing config file") and e.__context__:
                e = e.__context__  # ml_collections' wrapper around get_config's own error
            raise ValueError(f"{type(e).__name__}: {' '.join(str(e).split())}") from None
        return config


def _explain_config_files(flag_values: flags.FlagValues) -> None:
    """Gives every config-file flag the parser whose load errors are one line."""
    for name in flag_values:
        flag = flag_values[name]
        if isinstance(flag.parser, ConfigFileFlagParser):
            flag.parser = _ConfigFileParser(flag.parser)


def _check_finite_floats(flag_values: flags.FlagValues) -> None:
    """NaN and Inf pass absl's float parsing (and any bound); no program wants them."""
    for name in flag_values:
        flag = flag_values[name]
        value = flag.value
        if isinstance(flag.parser, flags.FloatParser) and isinstance(value, float):
            if not math.isfinite(value):
                usage_error(f"--{name}={value} is not allowed: must be a finite number")


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl flag parsing whose errors (incl. config files and unknown config keys) are one
    line and exit 2; float flags must be finite."""
    _explain_config_files(flag_values)
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        usage_error(str(e).splitlines()[0])
    except (AttributeError, KeyError) as e:
        # ml_collections raises these for --config.KEY overrides of keys that don't exist.
        bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        usage_error(f"unknown config key in {' '.join(bad) or 'overrides'} ({e})")
    _check_finite_floats(flag_values)
    return rest


def load_config_flag(value: Any) -> ml_collections.ConfigDict:
    """The --config flag's value as a ConfigDict, or a usage error naming the problem."""
    if value is None:
        usage_error("--config is required, e.g. --config=configs/tiny.py")
    try:
        value.keys()  # a config file that failed to load raises its error here
    except Exception as e:  # noqa: BLE001 - any load failure is a usage error
        usage_error(f"--config could not be loaded: {str(e).splitlines()[0]}")
    if not isinstance(value, ml_collections.ConfigDict):
        usage_error("--config must return an ml_collections.ConfigDict")
    return value


# Orbax warns about these on every read-only open; reading a run is not a problem.
_ORBAX_READ_ONLY_NOISE = ("read_only=True", "is read only", "could not be restored")


class _LibraryInfoFilter(std_logging.Filter):
    """Drops INFO records that Orbax logs through absl (dozens per checkpoint)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        if record.levelno <= std_logging.INFO:
            return False
        message = record.getMessage()
        if any(noise in message for noise in _ORBAX_READ_ONLY_NOISE):
            return False
        # Orbax logs a failed background save from each of its threads with a traceback, and
        # near_jax reports the same failure once, as one line: keep one short line of each.
        record.msg, record.args = one_line(message), None
        record.exc_info, record.exc_text = None, None
        return True


def quiet_library_logs() -> None:
    """Silences INFO chatter of libraries (JAX's backend probe, Orbax's save steps) and the
    echoes of a failed checkpoint read or write (`_drop_abandoned_io_reports`)."""
    std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
    std_logging.getLogger("absl").addFilter(_LibraryInfoFilter())
    _drop_abandoned_io_reports()


def _drop_abandoned_io_reports() -> None:
    """Drops the 'Event loop is closed' reports of I/O that a failed checkpoint abandoned.

    When one array of a restore or save fails, Orbax stops waiting and closes its event loop;
    the tensorstore operations still in flight then each report RuntimeError('Event loop is
    closed') through sys.unraisablehook as they finish: hundreds of traceback lines around the
    one line that says what is wrong. Other unraisable exceptions still reach the old hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_near_jax_quiet", False):
        return

    def hook(unraisable) -> None:
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook._near_jax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def run(main: Callable[[list[str]], None], define_flags: Callable[[], None]) -> None:
    """Defines a program's flags and runs `main` under absl with one-line flag errors."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    define_flags()
    app.run(main, flags_parser=parse_flags)
