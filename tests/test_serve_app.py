"""The server end to end: the official `openai` client against a live server on localhost.

One server per module (uvicorn in a thread, the real engine over a small trained-shape
model); greedy replies are checked against `Generator.generate` on the same params.
"""

import concurrent.futures
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import jax
import openai
import pytest
from helpers import save_run, small_config

from near_jax import model
from near_jax.contrib import identity
from near_jax.infer import loading
from near_jax.infer.generator import generator_for_run
from near_jax.serve import attestation, chat, engine, keys, metering, usage, usage_verify
from near_jax.serve.app import Server, Service

PRICES = (1_000_000, 3_000_000)  # micro-units per 1M prompt / completion tokens


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import uvicorn

    tmp = tmp_path_factory.mktemp("serve")
    cfg = small_config()
    cfg.data.seq_len = 96  # the context: room for a chat prompt

    mcfg = model.ModelConfig.from_config(cfg.model)
    # Sharper logits than at init, so greedy choices are not near-ties.
    params = jax.tree.map(lambda x: x * 1.5, model.init(mcfg, jax.random.key(0)))
    save_run(tmp / "run", cfg, params=params)
    run = loading.load_run(str(tmp / "run"), mesh=loading.inference_mesh())
    keys_path = str(tmp / "keys.json")
    secret = keys.add_key(keys_path, "alice", *PRICES, None)
    poor = keys.add_key(keys_path, "poor", *PRICES, 1)  # one micro-unit: any request is over
    ledger = usage.UsageLedger(str(tmp / "usage.sqlite"))
    eng = engine.engine_for_run(run, slots=8, prefill_chunk=8, max_queue=64)
    eng.warmup()
    eng.start()
    server_key = identity.generate()
    service = Service(
        engine=eng,
        tokenizer=run.tokenizer,
        meter=metering.Meter(keys.KeyRing.load(keys_path), ledger),
        identity=server_key,
        provider=attestation.provider("none"),
        model="tiny",
        context=eng.max_len,
        params_sha256=attestation.params_sha256(run.params),
        code_sha256=attestation.code_sha256(),
    )
    server = Server(service)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(server.app(), log_config=None))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    yield dict(
        base=base,
        client=openai.OpenAI(base_url=base + "/v1", api_key=secret, max_retries=0),
        secret=secret,
        poor=poor,
        run=run,
        generator=generator_for_run(run),
        server=server,
        engine=eng,
        ledger_path=str(tmp / "usage.sqlite"),
        key=server_key,
    )
    uv.should_exit = True
    thread.join(timeout=10)
    eng.shutdown()
    ledger.close()


def _greedy(served, text: str, max_tokens: int) -> tuple[str, int, bool]:
    """(text, tokens generated incl. EOS, ended at EOS) of `generate` for one prompt."""
    tok = served["run"].tokenizer
    out = served["generator"].generate([[tok.bos_id, *tok.encode(text)]], max_new_tokens=max_tokens)
    ids, eos = out.tokens[0], out.finished[0]
    return tok.decode(ids), len(ids) + eos, eos


def _post(served, path: str, body: bytes, secret: str | None = "default"):
    secret = served["secret"] if secret == "default" else secret
    headers = {"Content-Type": "application/json"}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    req = urllib.request.Request(served["base"] + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _get(served, path: str):
    try:
        with urllib.request.urlopen(served["base"] + path, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


PROMPTS = ["def ", "import numpy", "x", "class Foo:\n  "]


def test_completions_match_generate_and_count_usage(served):
    tok = served["run"].tokenizer
    for prompt in PROMPTS:
        r = served["client"].completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0
        )
        text, generated, eos = _greedy(served, prompt, 12)
        assert r.choices[0].text == text
        assert r.choices[0].finish_reason == ("stop" if eos else "length")
        assert r.usage.prompt_tokens == len(tok.encode(prompt)) + 1  # BOS
        assert r.usage.completion_tokens == generated
        assert r.usage.total_tokens == r.usage.prompt_tokens + generated
    # A list of prompts: one choice each, in order, usage summed.
    r = served["client"].completions.create(
        model="tiny", prompt=PROMPTS[:3], max_tokens=6, temperature=0
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [_greedy(served, p, 6)[0] for p in PROMPTS[:3]]
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) + 1 for p in PROMPTS[:3])


def test_streaming_gives_the_same_text_and_usage_at_the_end(served):
    chunks = list(
        served["client"].completions.create(
            model="tiny", prompt="def ", max_tokens=12, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _greedy(served, "def ", 12)[0]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) <= {None}
    assert chunks[-1].usage.completion_tokens == _greedy(served, "def ", 12)[1]


def test_chat_uses_the_plain_template(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = served["client"].chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    prompt = chat.render([("system", "Be brief."), ("user", "hi")])
    expected = _greedy(served, prompt, 10)[0].split(chat.TURN_STOP)[0]
    assert r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant"
    stream = served["client"].chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_stop_strings_cut_the_text_before_them(served):
    full, _, _ = _greedy(served, "import numpy", 16)
    stop = full[4:6]
    assert stop and stop in full
    for stream in (False, True):
        r = served["client"].completions.create(
            model="tiny",
            prompt="import numpy",
            max_tokens=16,
            temperature=0,
            stop=[stop],
            stream=stream,
        )
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert text == full[: full.find(stop)] and finish == "stop"


def test_32_concurrent_clients_are_all_answered_with_generates_output(served):
    prompts = [f"{PROMPTS[i % 4]}{i}" for i in range(32)]

    def ask(prompt):
        r = served["client"].completions.create(
            model="tiny", prompt=prompt, max_tokens=10, temperature=0
        )
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(ask, prompts))
    assert texts == [_greedy(served, p, 10)[0] for p in prompts]


def test_seeded_sampling_is_reproducible(served):
    def ask():
        return (
            served["client"]
            .completions.create(
                model="tiny",
                prompt="x",
                max_tokens=12,
                temperature=1.0,
                top_p=0.9,
                seed=7,
                extra_body={"top_k": 50},
            )
            .choices[0]
            .text
        )

    assert ask() == ask()


@pytest.mark.parametrize(
    "body,secret,status,message",
    [
        (b'{"prompt": "x"}', "nj-wrong", 401, "unknown API key"),
        (b'{"prompt": "x"}', None, 401, "API key"),
        (b'{"prompt": "x", "max_tokens": 2}', "poor", 402, "limit"),
        (b'{"prompt": "x", "max_tokens": 0}', "default", 400, "max_tokens=0 is not allowed"),
        (b'{"prompt": "x", "max_tokens": 100}', "default", 400, "max_tokens=100 is not allowed"),
        (b'{"prompt": 3}', "default", 400, "prompt must be"),
        (b"{nope", "default", 400, "not valid JSON"),
        (b'{"prompt": "x", "model": "gpt-9"}', "default", 404, "'gpt-9' is not served"),
    ],
)
def test_refusals_have_their_code_and_a_one_line_message(served, body, secret, status, message):
    if secret == "poor":
        secret = served["poor"]
    code, _, reply = _post(served, "/v1/completions", body, secret)
    error = json.loads(reply)["error"]
    assert code == status and error["code"] == status, reply
    assert message in error["message"] and "\n" not in error["message"], error
    # The server keeps serving.
    assert served["client"].completions.create(model="tiny", prompt="x", max_tokens=2).usage


def test_a_full_queue_answers_429(served, monkeypatch):
    def full(request, emit):
        raise engine.QueueFull("full")

    monkeypatch.setattr(served["engine"], "submit", full)
    with pytest.raises(openai.RateLimitError):
        served["client"].completions.create(model="tiny", prompt="x", max_tokens=2)
    monkeypatch.undo()
    assert served["client"].completions.create(model="tiny", prompt="x", max_tokens=2).usage


def test_replies_are_signed_and_the_report_binds_the_key(served):
    body = json.dumps({"prompt": "def ", "max_tokens": 4, "temperature": 0}).encode()
    code, headers, reply = _post(served, "/v1/completions", body)
    assert code == 200
    signed = {
        "text": headers["X-Signature-Text"],
        "signature": headers["X-Signature"],
        "signing_key": headers["X-Signing-Key"],
        "algorithm": "ed25519",
    }
    assert attestation.verify_exchange(body, reply, signed) == ""
    assert attestation.verify_exchange(body, reply.replace(b"def", b"DEF") + b" ", signed) != ""
    # A streamed reply: its signature is fetched by id and covers the bytes as sent.
    stream_body = json.dumps({"prompt": "x", "max_tokens": 4, "stream": True}).encode()
    code, headers, sent = _post(served, "/v1/completions", stream_body)
    assert code == 200 and sent.endswith(b"data: [DONE]\n\n")
    code, kept = _get(served, f"/v1/signature/{headers['X-Request-Id']}")
    assert code == 200 and attestation.verify_exchange(stream_body, sent, json.loads(kept)) == ""
    assert _get(served, "/v1/signature/cmpl-unknown")[0] == 404

    nonce = "ab" * 32
    code, report = _get(served, f"/v1/attestation/report?nonce={nonce}")
    report = json.loads(report)
    assert code == 200 and report["signing_key"] == served["key"].public_hex
    assert report["params_sha256"] == attestation.params_sha256(served["run"].params)
    assert attestation.verify_report(report, nonce) == []
    assert attestation.verify_report(report, "cd" * 32) != []
    assert _get(served, "/v1/attestation/report?nonce=xyz")[0] == 400


def test_models_health_and_metrics(served):
    assert [m.id for m in served["client"].models.list().data] == ["tiny"]
    code, health = _get(served, "/health")
    assert code == 200 and json.loads(health)["status"] == "ok"
    served["client"].completions.create(model="tiny", prompt="x", max_tokens=3)
    code, text = _get(served, "/metrics")
    text = text.decode()
    assert code == 200
    for name in (
        'near_jax_requests_total{endpoint="completions",status="200"}',
        "near_jax_completion_tokens_total",
        "near_jax_queue_depth",
        "near_jax_batch_occupancy",
        "near_jax_time_to_first_token_seconds_count",
        "near_jax_time_per_output_token_seconds_count",
    ):
        assert name in text, name


def test_the_usage_ledger_holds_every_answered_request_and_verifies(served):
    served["client"].completions.create(model="tiny", prompt="x", max_tokens=3)
    assert usage_verify.verify(served["ledger_path"]) == []
    totals = usage_verify.period_totals(served["ledger_path"], 0, time.time() + 1)
    assert totals["requests"] >= 40 and totals["revenue"] > 0


def test_a_client_that_leaves_mid_stream_is_billed_for_what_was_made(served):
    import http.client

    before = usage_verify.period_totals(served["ledger_path"], 0, time.time() + 1)["requests"]
    conn = http.client.HTTPConnection(served["base"].removeprefix("http://"), timeout=30)
    body = json.dumps({"prompt": "x", "max_tokens": 90, "stream": True})
    conn.request(
        "POST",
        "/v1/completions",
        body,
        {"Content-Type": "application/json", "Authorization": f"Bearer {served['secret']}"},
    )
    reply = conn.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    conn.close()
    deadline = time.time() + 30
    while time.time() < deadline:
        totals = usage_verify.period_totals(served["ledger_path"], 0, time.time() + 1)
        if totals["requests"] > before and served["engine"].stats()["active_slots"] == 0:
            break
        time.sleep(0.05)
    assert totals["requests"] == before + 1  # recorded once, as cancelled
    # ... because the stream was cut before its end (status 499 in the metrics).
    assert 'status="499"} 1.0' in _get(served, "/metrics")[1].decode()
    assert served["engine"].stats()["active_slots"] == 0  # its slot is free again
    assert usage_verify.verify(served["ledger_path"]) == []


def test_an_oversized_body_is_refused_and_a_failed_engine_is_unhealthy(served, monkeypatch):
    from near_jax.serve import app as app_module

    monkeypatch.setattr(app_module, "MAX_BODY_BYTES", 64)
    code, _, reply = _post(served, "/v1/completions", json.dumps({"prompt": "x" * 100}).encode())
    assert code == 413 and "over 64 bytes" in json.loads(reply)["error"]["message"]
    monkeypatch.undo()
    stats = served["engine"].stats
    monkeypatch.setattr(served["engine"], "stats", lambda: {**stats(), "error": "boom"})
    code, health = _get(served, "/health")
    assert code == 503 and json.loads(health)["error"] == "boom"
