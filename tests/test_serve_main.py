"""`python -m near_jax.serve`: the commands, their one-line errors, and kill -9 mid-stream."""

import http.client
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from helpers import run_module, save_run, small_config, start_module, subprocess_env

from near_jax.serve import keys, usage, usage_verify


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_keys_adds_a_key_whose_secret_is_printed_once(tmp_path):
    path = str(tmp_path / "keys.json")
    proc = run_module(
        "near_jax.serve",
        "keys",
        f"--keys={path}",
        "--name=bob",
        "--prompt_price=5",
        "--limit=100",
        env=subprocess_env(devices=1),
    )
    assert proc.returncode == 0, proc.stderr
    secret = proc.stdout.strip()
    assert secret.startswith("nj-") and secret not in open(path).read()
    key = keys.KeyRing.load(path).lookup(secret)
    assert (key.name, key.prompt_price, key.limit) == ("bob", 5, 100)


@pytest.mark.parametrize(
    "args,message",
    [
        (["nope"], "unknown command 'nope'"),
        (["keys", "--name=x"], "keys needs --keys=PATH and --name=NAME"),
        ([], "--workdir is required"),
        (["--workdir=/nonexistent/run"], "no such directory"),
        (["serve", "--workdir=/tmp", "--attestation=sgx"], "--attestation"),
        (["serve", "extra"], "unexpected arguments: extra"),
        (["keys", "--keys=k.json", "--name=a", "--port=1"], "--port does not apply to keys"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(args, message):
    proc = run_module("near_jax.serve", *args, env=subprocess_env(devices=1))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _start_server(workdir, state, port):
    proc = start_module(
        "near_jax.serve",
        f"--workdir={workdir}",
        f"--state_dir={state}",
        f"--port={port}",
        "--slots=4",
        "--prefill_chunk=16",
        env=subprocess_env(devices=1),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("the server did not come up")


def _complete(port, body, stream=False):
    data = json.dumps({**body, "stream": stream}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=data,
        headers={"Content-Type": "application/json"},
    )
    return urllib.request.urlopen(req, timeout=60)


def _rest(response) -> bytes:
    """What is left of a response whose server was killed (the bytes that came)."""
    got = b""
    try:
        while line := response.readline():
            got += line
    except (http.client.IncompleteRead, OSError):  # the chunked body was cut
        pass
    return got


def test_kill_9_mid_stream_leaves_a_ledger_that_verifies(tmp_path):
    cfg = small_config()
    cfg.data.seq_len = 1024  # long streams: still running when the server is killed
    save_run(tmp_path / "run", cfg)
    state, port = tmp_path / "state", _free_port()
    proc = _start_server(tmp_path / "run", state, port)
    try:
        with _complete(port, {"prompt": "done", "max_tokens": 3}) as r:
            finished_id = json.loads(r.read())["id"]
        streams = [_complete(port, {"prompt": f"p{i}", "max_tokens": 1000}, True) for i in range(3)]
        for s in streams:
            assert s.readline().startswith(b"data: ")  # each is streaming now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # Random weights may draw EOS early: a stream that got to its end ([DONE], sent
        # after its usage was committed) before the kill is recorded; the others are cut.
        done = sum(b"data: [DONE]" in _rest(s) for s in streams)
    finally:
        if proc.poll() is None:
            proc.kill()
    ledger = str(state / "usage.sqlite")
    assert usage_verify.verify(ledger) == []
    rows = usage_verify.period_totals(ledger, 0, time.time() + 1)
    # the finished request and any stream that finished; the killed streams are absent
    assert rows["requests"] == 1 + done
    # A restarted server appends to the same ledger, which still verifies.
    proc = _start_server(tmp_path / "run", state, port)
    try:
        with _complete(port, {"prompt": "again", "max_tokens": 3}) as r:
            assert json.loads(r.read())["id"] != finished_id
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert usage_verify.verify(ledger) == []
    assert usage_verify.period_totals(ledger, 0, time.time() + 1)["requests"] == 2 + done


def test_verify_checks_a_saved_reply_and_a_report(tmp_path):
    from near_jax.contrib import identity
    from near_jax.serve import attestation

    key = identity.generate()
    request, response = b'{"prompt": "x"}', b'{"choices": [{"text": "y"}]}'
    signed = attestation.sign_exchange(key, request, response)
    nonce = "ab" * 32
    report = attestation.report(
        key, "none", nonce, model="m", params_sha256="0" * 64, code_sha256="1" * 64
    )
    (tmp_path / "report.json").write_text(json.dumps(report))
    (tmp_path / "sig.json").write_text(json.dumps(signed))
    (tmp_path / "req.json").write_bytes(request)
    (tmp_path / "resp.json").write_bytes(response)
    tampered = attestation.receipt(request, response.replace(b"y", b"z"), signed)
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    env = subprocess_env(devices=1)
    ok = run_module(
        "near_jax.serve",
        "verify",
        f"--request={tmp_path / 'req.json'}",
        f"--response={tmp_path / 'resp.json'}",
        f"--signature={tmp_path / 'sig.json'}",
        f"--report={tmp_path / 'report.json'}",
        f"--nonce={nonce}",
        env=env,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert key.public_hex in ok.stdout and "UNATTESTED" in ok.stdout
    bad = run_module(
        "near_jax.serve",
        "verify",
        f"--receipt={tmp_path / 'tampered.json'}",
        f"--report={tmp_path / 'report.json'}",
        f"--nonce={'cd' * 32}",
        env=env,
    )
    assert bad.returncode == 1
    assert "response" in bad.stdout and "nonce" in bad.stdout, bad.stdout


def test_payout_splits_a_periods_revenue_and_refuses_a_damaged_usage_ledger(tmp_path, world):
    import sqlite3

    from contrib_world import RUN

    from near_jax.contrib import identity
    from near_jax.serve import payout

    path = str(tmp_path / "usage.sqlite")
    with usage.UsageLedger(path) as ledger:
        for i in range(5):
            cost = 1_000_003 * (i + 1)
            ledger.record(f"r{i}", "alice", "a" * 64, "m", 3, 4, cost, "stop", 1_800_000_000.0 + i)
        ledger.record("late", "alice", "a" * 64, "m", 3, 4, 999, "stop", 1_900_000_000.0)
    identity.save(identity.generate(), tmp_path / "server.key")
    args = [
        "payout",
        f"--usage={path}",
        f"--store={world.store.url}",
        f"--run={RUN}",
        "--period=1800000000,1800000100",
        f"--key={tmp_path / 'server.key'}",
        f"--out={tmp_path / 'statement.json'}",
        f"--csv={tmp_path / 'payout.csv'}",
        "--host_share=0.1",
        "--holders_share=0.25",
    ]
    proc = run_module("near_jax.serve", *args, env=subprocess_env(devices=1))
    assert proc.returncode == 0, proc.stderr
    stmt = json.loads((tmp_path / "statement.json").read_text())
    revenue = sum(1_000_003 * (i + 1) for i in range(5))  # the late request is outside
    assert stmt["revenue"] == revenue and stmt["requests"] == 5
    amounts = [int(line.split(",")[-1]) for line in proc.stdout.strip().splitlines()[1:]]
    assert sum(amounts) == revenue and stmt["holders_amount"] == revenue // 4
    assert payout.verify_statement(stmt, store=world.store) == []
    with sqlite3.connect(path) as conn:  # someone edits a cost
        conn.execute("UPDATE usage SET cost = cost + 1 WHERE request_id = 'r2'")
    proc = run_module("near_jax.serve", *args, env=subprocess_env(devices=1))
    assert proc.returncode == 1 and "usage ledger" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
