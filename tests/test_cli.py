"""Tests of near_jax.cli: one-line usage errors for config files and float flags."""

import math

import pytest
from absl import flags
from helpers import run_module
from ml_collections import config_flags

from near_jax import cli


def _usage_error(capsys, argv, define) -> str:
    """Parses argv with fresh flags; returns the one stderr line of the exit-2 usage error."""
    fv = flags.FlagValues()
    define(fv, argv)
    with pytest.raises(SystemExit) as e:
        cli.parse_flags(argv, fv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _config_flag(fv, argv):
    config_flags.DEFINE_config_file("config", None, "Config.", flag_values=fv, sys_argv=argv)


def test_config_file_errors_are_one_line_naming_the_path(tmp_path, capsys):
    missing = str(tmp_path / "nope.py")
    err = _usage_error(capsys, ["prog", f"--config={missing}"], _config_flag)
    assert missing in err and "no such file" in err

    bad = tmp_path / "bad.py"
    bad.write_text("import math\n\ndef get_config(:\n    pass\n")
    for argv in (["prog", f"--config={bad}"], ["prog", f"--config={bad}", "--config.seed=1"]):
        err = _usage_error(capsys, argv, _config_flag)
        assert str(bad) in err and "line 3" in err and "syntax" in err

    noget = tmp_path / "noget.py"
    noget.write_text("x = 1\n")
    err = _usage_error(capsys, ["prog", f"--config={noget}"], _config_flag)
    assert str(noget) in err and "get_config" in err

    raising = tmp_path / "raising.py"
    raising.write_text("def get_config(name):\n    return {'a': 1}[name]\n")
    err = _usage_error(capsys, ["prog", f"--config={raising}:zzz"], _config_flag)
    assert str(raising) in err and "KeyError" in err and "zzz" in err


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_float_flags_are_usage_errors(capsys, value):
    def define(fv, argv):
        flags.DEFINE_float("temperature", 0.8, "Temperature.", flag_values=fv)

    err = _usage_error(capsys, ["prog", f"--temperature={value}"], define)
    assert f"--temperature={value}" in err and "finite" in err


def test_a_program_with_a_broken_config_file_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    proc = run_module("near_jax.train", f"--config={bad}", f"--workdir={tmp_path}/w")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "line 1" in lines[0], proc.stderr
