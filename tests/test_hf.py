"""`python -m near_jax.hf`: bad input and unreadable checkpoints are one line, and the
package re-exports the conversion. (Conversion: test_convert.py; files: test_exchange.py.)"""

import shutil

import pytest
from helpers import damage_step, run_module, subprocess_env

from near_jax import hf

pytest.importorskip("safetensors.numpy")  # the rest of near_jax does not need it


def _cli(*args):  # XLA_FLAGS="": XLA's defaults (one CPU device)
    return run_module("near_jax.hf", *args, env=subprocess_env(XLA_FLAGS=""), timeout=120)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = _cli("export", f"--workdir={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no such directory" in proc.stderr

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    proc = _cli("import", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "config.json: not valid JSON" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_hf_reexports_the_conversion():
    from near_jax.hf import convert as hf_convert

    names = (
        "DTYPES",
        "HFError",
        "iter_hf_tensors",
        "llama_config",
        "model_overrides",
        "params_from_hf",
        "params_to_hf",
    )
    for name in names:
        assert getattr(hf, name) is getattr(hf_convert, name), name


def test_cli_export_of_unreadable_checkpoints_is_one_line_and_exit_1(tmp_path, saved_run):
    shutil.copytree(saved_run, tmp_path / "run")
    damage_step(tmp_path / "run", 5, "arrays_deleted")
    proc = _cli("export", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'out'}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) < 10, proc.stderr[-3000:]
    assert "export failed: " in lines[-1] and "no checkpoint could be read" in lines[-1]
    assert not (tmp_path / "out").exists()
