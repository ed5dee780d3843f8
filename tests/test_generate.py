"""`python -m near_jax.generate`: samples from a checkpoint, one-line errors and exit codes."""

import shutil

from helpers import damage_step, run_module, subprocess_env


def test_cli_samples_from_a_checkpoint_and_rejects_bad_input(tmp_path, saved_run):
    proc = run_module(
        "near_jax.generate",
        f"--workdir={saved_run}",
        "--prompt=def ",
        "--prompt=import",
        "--max_new_tokens=8",
        "--format=jsonl",
        env=subprocess_env(devices=2),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and '"prompt": "def "' in lines[0]
    assert "tokens/s" in proc.stderr
    for args, message in [
        ([f"--workdir={tmp_path / 'missing'}", "--prompt=x"], "no such directory"),
        ([f"--workdir={tmp_path}", "--prompt=x"], "no committed checkpoint"),
        ([f"--workdir={saved_run}", "--prompt=x", "--step=999"], "--step=999: not found"),
        ([f"--workdir={saved_run}", "--prompt=x", "--top_p=0"], "top_p=0.0 is not allowed"),
        ([f"--workdir={saved_run}"], "no prompt"),
        # data.seq_len of the run is 32; "x" is 2 tokens with BOS.
        (
            [f"--workdir={saved_run}", "--prompt=x", "--max_new_tokens=100000000"],
            "max_new_tokens=100000000 is not allowed: at most 30",
        ),
    ]:
        proc = run_module("near_jax.generate", *args, env=subprocess_env(devices=2))
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
            args,
            proc.stderr,
        )


def test_cli_a_damaged_step_is_one_line_and_exit_1(tmp_path, saved_run):
    shutil.copytree(saved_run, tmp_path / "run")
    damage_step(tmp_path / "run", 5, "arrays_truncated")
    args = [f"--workdir={tmp_path / 'run'}", "--prompt=x", "--step=5"]
    proc = run_module("near_jax.generate", *args, env=subprocess_env(devices=2))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert "checkpoint step 5: unreadable (" in lines[0] and "the manifest says" in lines[0]
