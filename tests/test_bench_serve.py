"""bench/serve.py at toy size: the server against one-at-a-time generate, one JSON line."""

import importlib.util
import json
import pathlib

from helpers import REPO


def _bench():
    path = pathlib.Path(REPO) / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_quick_run_prints_a_table_and_one_json_line(capfd):
    result = _bench().main(
        [
            "--requests=6",
            "--max_tokens=6",
            "--prompt_len=8",
            "--context=32",
            "--concurrency=1,3",
            "--slots=4",
            "--prefill_chunk=8",
            "--repeats=1",
        ]
    )
    out = capfd.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(result))
    assert "out tok/s" in out[0] and len(out) == 1 + 3 + 1  # header, 3 rows, JSON
    rows = result["rows"]
    assert [r.get("concurrency") for r in rows] == [None, 1, 3]
    # Greedy replies through the server are exactly generate's, and every row made tokens.
    assert all(r["mismatches"] == 0 for r in rows[1:])
    assert all(r["tokens_per_s"] > 0 and r["p99_s"] >= r["p50_s"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0


def test_bad_flags_are_refused(capsys):
    import pytest

    for args in (["--concurrency=0"], ["--prompt_len=100", "--context=64"]):
        with pytest.raises(SystemExit) as e:
            _bench().main(args)
        assert e.value.code == 2
