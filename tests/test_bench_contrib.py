"""bench/contrib.py --adversarial: the contributor gauntlet runs and reports one JSON line."""

import importlib.util
import json
import pathlib

from helpers import REPO


def test_adversarial_quick_run_prints_a_table_and_one_json_line(capsys):
    path = pathlib.Path(REPO) / "bench" / "contrib.py"
    spec = importlib.util.spec_from_file_location("bench_contrib", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    returned = bench.main(
        ["--adversarial", "--rounds=2", "--cost-contributors=10", "--sample=3", "--repeats=1"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert "adversary" in "\n".join(lines)
    result = json.loads(lines[-1])
    assert result == json.loads(json.dumps(returned))
    assert result["bench"] == "contrib_adversarial" and result["rounds"] == 2
    kinds = [a["kind"] for a in result["adversaries"]]
    assert kinds == ["lazy", "valtrained", "nearcopy", "sybils-open", "sybils-allowlisted"]
    for a in result["adversaries"]:
        assert set(a) >= {"kind", "caught", "rounds", "reasons", "reward"}
        assert 0 <= a["caught"] <= a["rounds"] and a["reward"] >= 0
    # 20 sybils, 2 rounds: an allowlisted run rejects every push for the allowlist.
    closed = result["adversaries"][-1]
    assert closed["rounds"] == 40 and closed["caught"] == 40
    assert closed["reasons"] == ["not on the run's allowlist"] and closed["reward"] == 0
    assert 0 <= result["honest_reward_share"] <= 1
    assert -1 < result["loss_gap_vs_honest"] < 1
    cost = result["validation_cost"]
    assert cost["n"] == 10 and cost["k"] == 3
    assert 0 < cost["evaluations"]["ratio"] <= 1
    assert cost["validated"]["sampled"] >= 3 and cost["validated_beyond_k"] >= 0
