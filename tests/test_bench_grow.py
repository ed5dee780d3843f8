"""bench/grow.py at tiny budgets: A, scratch B and a grown B train; one JSON line comes out."""

import importlib.util
import json
import math
import pathlib

from helpers import REPO


def _bench():
    path = pathlib.Path(REPO) / "bench" / "grow.py"
    spec = importlib.util.spec_from_file_location("bench_grow", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_tokens_to_interpolates_between_evaluations():
    tokens_to = _bench().tokens_to
    curve = [(0, 4.0), (100, 3.0), (200, 2.0)]
    assert tokens_to(curve, 2.5) == 150.0
    assert tokens_to(curve, 4.5) == 0.0  # reached before any training
    assert tokens_to(curve, 1.0) is None


def test_quick_run_prints_a_table_and_one_json_line(capsys):
    # clone + identity preserves the function: the grown params' step-0 eval loss is A's
    # final eval loss (same validation batches), which fails if growth is wrong.
    returned = _bench().main(
        [
            "--width=clone",
            "--depth=identity",
            "--tokens_a=2048",
            "--tokens_b=2048",
            "--seq_len=64",
            "--batch=8",
            "--eval_every=2",
            "--eval_batches=2",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert "grown B" in "\n".join(lines) and "clone+identity" in "\n".join(lines)
    result = json.loads(lines[-1])
    assert result == json.loads(json.dumps(returned))
    assert result["bench"] == "grow" and result["width"] == "clone"
    assert result["tokens_a"] == 2048 and result["tokens_scratch_to_target"] == 2048
    assert 3.0 < result["params_b"] / result["params_a"] < 5.0
    assert result["flops_per_token_b"] > result["flops_per_token_a"] > 0
    assert 0 < result["a_in_b_tokens"] < result["tokens_a"]
    option = result["options"]["clone+identity"]
    assert math.isclose(option["step0_loss"], result["a_final_loss"], rel_tol=1e-5)
    # (a float-rounding hair above A's loss can put "tokens to A's loss" past step 0)
    assert option["tokens_to_a_loss"] is None or option["tokens_to_a_loss"] <= 2048
    assert math.isfinite(option["final_loss"]) and option["grow_seconds"] > 0
    grown = option["tokens_grown_to_target"]
    assert grown is None or 0 <= grown <= 2048
    if grown:
        assert math.isclose(result["speedup"], 2048 / grown)
        assert result["speedup_with_a"] < result["speedup"]
    curve = result["curves_seed0"]["clone+identity"]
    assert curve[0][0] == 0 and [t for t, _ in curve[1:]] == [1024, 2048]
