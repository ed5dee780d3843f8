"""Serving a run: python -m near_jax.serve [COMMAND] [flags]

    (serve)  --workdir=RUN [--step=N] [--host=127.0.0.1] [--port=8000] [--keys=keys.json]
             [--state_dir=near_jax_serve] [--slots=16] [--prefill_chunk=64] [--max_queue=256]
             [--step_tokens=512] [--length_buckets=4] [--fsdp=1] [--tensor=1]
             [--model_name=NAME]
             [--attestation=none]
                                     the OpenAI-compatible server (the default command)
    keys     --keys=keys.json --name=NAME [--prompt_price=P] [--completion_price=C]
             [--limit=L]             adds an API key and prints its secret, once
    verify   --receipt=FILE [--report=FILE --nonce=HEX] [--require_attested]
                                     checks a saved reply's signature and an attestation report
    payout   --usage=usage.sqlite --store=URL --run=RUN --period=START,END --key=server.key
             [--host_share=0.1] [--holders_share=0.2] [--host_name=NAME] --out=STATEMENT.json
             [--csv=PATH]            splits a period's revenue among the run's contributors

Prices are integer micro-units per million tokens; limits and payouts are integer
micro-units. The server keeps its state in --state_dir: the usage ledger (usage.sqlite) and
its ed25519 signing key (server.key, created on first start). Without --keys the server is
open: every request is metered at price 0 under the key "anonymous".

Exit status: 0 done, 1 a failure (one line on stderr: an unreadable run, a ledger or receipt
that does not verify), 2 a command-line mistake (one line on stderr).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Any

import uvicorn
from absl import flags

from near_jax import cli
from near_jax._io import atomic_write, one_line
from near_jax.cli import quiet_library_logs, usage_error
from near_jax.contrib import identity
from near_jax.diloco.protocol import ProtocolError
from near_jax.diloco.store import ObjectStore, StoreError
from near_jax.infer import loading
from near_jax.serve import attestation, keys, metering, usage, usage_verify
from near_jax.serve import payout as payout_lib
from near_jax.serve.app import Server, Service
from near_jax.serve.engine import engine_for_run

_PROG = "near_jax.serve"
_SERVE = (
    "workdir step host port keys state_dir slots prefill_chunk max_queue step_tokens "
    "length_buckets model_name attestation"
)
FLAGS_OF = {
    "serve": (*_SERVE.split(), "fsdp", "tensor"),
    "keys": ("keys", "name", "prompt_price", "completion_price", "limit"),
    "verify": (
        "receipt",
        "request",
        "response",
        "signature",
        "report",
        "nonce",
        "require_attested",
    ),
    "payout": (*"usage store run period key host_share holders_share host_name out csv".split(),),
}
COMMANDS = tuple(FLAGS_OF)


def define_flags() -> None:
    """Every command's flags (each command checks which apply)."""
    flags.DEFINE_string("workdir", None, "serve: the run directory to serve.")
    flags.DEFINE_integer("step", None, "serve: checkpoint step; default the latest committed.")
    flags.DEFINE_string("host", "127.0.0.1", "serve: address to listen on.")
    flags.DEFINE_integer("port", 8000, "serve: TCP port.", lower_bound=0, upper_bound=65535)
    flags.DEFINE_string("keys", None, "serve, keys: the API keys file (serve: none = open).")
    flags.DEFINE_string("state_dir", "near_jax_serve", "serve: usage ledger and signing key.")
    flags.DEFINE_integer("slots", 16, "serve: sequences decoded together.", lower_bound=1)
    flags.DEFINE_integer("prefill_chunk", 64, "serve: prompt tokens per prefill call.")
    flags.DEFINE_integer("max_queue", 256, "serve: waiting requests before 429.", lower_bound=1)
    flags.DEFINE_integer(
        "step_tokens", 512, "serve: tokens per engine step (decoding rows + prefill chunks)."
    )
    flags.DEFINE_integer(
        "length_buckets",
        4,
        "serve: attention spans (the context halved up to N-1 times); each is one more "
        "compile of every decode bucket at start-up, and a decode step reads the smallest "
        "span its sequences fit.",
    )
    flags.DEFINE_string("model_name", None, "serve: the model id; default the run's name.")
    flags.DEFINE_string("attestation", "none", "serve: attestation provider.")
    flags.DEFINE_string("name", None, "keys: the key's name.")
    flags.DEFINE_integer("prompt_price", 0, "keys: micro-units per 1M prompt tokens.")
    flags.DEFINE_integer("completion_price", 0, "keys: micro-units per 1M completion tokens.")
    flags.DEFINE_integer("limit", None, "keys: spend limit in micro-units; none = unlimited.")
    flags.DEFINE_string("receipt", None, "verify: a saved reply (attestation.receipt's JSON).")
    flags.DEFINE_string("request", None, "verify: the request body as sent (with --response).")
    flags.DEFINE_string("response", None, "verify: the response body as received.")
    flags.DEFINE_string("signature", None, "verify: the reply's GET /v1/signature/{id} JSON.")
    flags.DEFINE_string("report", None, "verify: an attestation report (JSON) to check too.")
    flags.DEFINE_string("nonce", None, "verify: the nonce (hex) the report was asked with.")
    flags.DEFINE_bool("require_attested", False, "verify: refuse an unattested report.")
    flags.DEFINE_string("usage", None, "payout: the server's usage ledger (usage.sqlite).")
    flags.DEFINE_string("store", None, "payout: the contributor run's store URL.")
    flags.DEFINE_string("run", None, "payout: the contributor run that trained the model.")
    flags.DEFINE_string("period", None, "payout: START,END (YYYY-MM-DD UTC or unix seconds).")
    flags.DEFINE_string("key", None, "payout: the server's signing key (server.key).")
    flags.DEFINE_float("host_share", 0.1, "payout: the serving host's share (0 to 1).")
    flags.DEFINE_float("holders_share", 0.2, "payout: the token holders' share (0 to 1).")
    flags.DEFINE_string("host_name", "host", "payout: the serving host's payee name.")
    flags.DEFINE_string("out", None, "payout: where to write the signed JSON statement.")
    flags.DEFINE_string("csv", None, "payout: also write the payees as CSV.")
    loading.define_mesh_flags()


def _fail(message: str) -> None:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    sys.exit(1)


def serve(f: flags.FlagValues) -> None:
    """Loads the run and serves it until interrupted."""
    if not f.workdir:
        usage_error("--workdir is required: the run directory to serve")
    if f.prefill_chunk < 1:
        usage_error(f"--prefill_chunk={f.prefill_chunk} is not allowed: must be >= 1")
    try:
        provider = attestation.provider(f.attestation)
    except ValueError as e:
        usage_error(f"--attestation: {e}")
    try:
        keyring = keys.KeyRing.load(f.keys) if f.keys else keys.KeyRing.open()
    except (OSError, ValueError) as e:
        usage_error(f"--keys={f.keys}: {e}")
    try:
        run = loading.load_run(f.workdir, f.step, loading.inference_mesh(f.fsdp, f.tensor))
    except loading.CheckpointUnreadable as e:
        _fail(str(e))
    except loading.RunError as e:
        usage_error(str(e))
    state = os.path.abspath(f.state_dir)
    os.makedirs(state, exist_ok=True)
    key_path = os.path.join(state, "server.key")
    try:
        if not os.path.exists(key_path):
            identity.save(identity.generate(), key_path)
        server_key = identity.load(key_path)
    except identity.IdentityError as e:
        _fail(f"{key_path}: {e}")
    ledger = usage.UsageLedger(os.path.join(state, "usage.sqlite"))
    try:
        eng = engine_for_run(
            run,
            slots=f.slots,
            prefill_chunk=f.prefill_chunk,
            max_queue=f.max_queue,
            step_tokens=f.step_tokens,
            length_buckets=f.length_buckets,
        )
    except ValueError as e:  # a setting below its minimum, or a cache that does not fit
        usage_error(str(e))
    model_name = f.model_name or os.path.basename(os.path.normpath(f.workdir))
    print(f"{_PROG}: compiling {model_name} (step {run.step}, {f.slots} slots)", file=sys.stderr)
    eng.warmup()
    eng.start()
    service = Service(
        engine=eng,
        tokenizer=run.tokenizer,
        meter=metering.Meter(keyring, ledger),
        identity=server_key,
        provider=provider,
        model=model_name,
        context=eng.max_len,
        params_sha256=attestation.params_sha256(run.params),
        code_sha256=attestation.code_sha256(),
    )
    app = Server(service).app(on_shutdown=[eng.shutdown, ledger.close])
    print(
        f"{_PROG}: serving {model_name} on http://{f.host}:{f.port}/v1 "
        f"(signing key {server_key.key_id}, usage {ledger.path})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=f.host, port=f.port, log_level="warning", timeout_graceful_shutdown=5)


def add_key(f: flags.FlagValues) -> None:
    """Adds an API key to --keys and prints its secret."""
    if not f.keys or not f.name:
        usage_error("keys needs --keys=PATH and --name=NAME")
    try:
        secret = keys.add_key(f.keys, f.name, f.prompt_price, f.completion_price, f.limit)
    except ValueError as e:
        usage_error(str(e))
    except OSError as e:
        _fail(f"--keys={f.keys}: {e}")
    print(secret)
    shown = f"{_PROG}: added key {f.name!r} to {f.keys}; the secret above is shown only once"
    print(shown, file=sys.stderr)


def _read_json(flag: str, path: str) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        usage_error(f"--{flag}={path}: no such file")
    except (OSError, ValueError) as e:
        _fail(f"--{flag}={path}: not readable JSON ({one_line(e)})")


def _read_bytes(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        usage_error(f"--{flag}={path}: {e.strerror or e}")


def verify(f: flags.FlagValues) -> None:
    """Checks a saved reply's signature (and a report, when given); exit 1 if anything fails."""
    pieces = (f.request, f.response, f.signature)
    if bool(f.receipt) == any(pieces):
        usage_error("verify takes --receipt=FILE, or --request, --response and --signature")
    if any(pieces) and not all(pieces):
        usage_error("verify needs all of --request, --response and --signature")
    if bool(f.report) != bool(f.nonce):
        usage_error("--report and --nonce go together: the nonce the report was asked with")
    if f.receipt:
        receipt = _read_json("receipt", f.receipt)
    else:
        signed = _read_json("signature", f.signature)
        body_in, body_out = _read_bytes("request", f.request), _read_bytes("response", f.response)
        receipt = attestation.receipt(body_in, body_out, signed if isinstance(signed, dict) else {})
    report = _read_json("report", f.report) if f.report else None
    try:
        problems = attestation.verify_receipt(receipt, report, f.nonce, f.require_attested)
    except ValueError as e:  # a malformed --nonce
        usage_error(f"--nonce: {e}")
    for problem in problems:
        print(problem)
    if problems:
        sys.exit(1)
    signer = receipt.get("signed", {}).get("signing_key", "?") if isinstance(receipt, dict) else "?"
    print(f"OK: the reply is signed by {signer}")
    if report is not None:
        state = "attested" if report.get("attested") else "UNATTESTED (provider none)"
        print(f"OK: the report binds that key to nonce {f.nonce}: {state}")


def _period(text: str | None) -> tuple[float, float]:
    parts = (text or "").split(",")
    if len(parts) != 2:
        usage_error(f"--period={text!r}: must be START,END (YYYY-MM-DD UTC or unix seconds)")
    bounds = []
    for part in parts:
        try:
            bounds.append(
                float(part)
                if part.strip().replace(".", "").isdigit()
                else datetime.datetime.strptime(part.strip(), "%Y-%m-%d")
                .replace(tzinfo=datetime.UTC)
                .timestamp()
            )
        except ValueError:
            usage_error(f"--period: {part!r} is not a date (YYYY-MM-DD) or unix seconds")
    if bounds[1] <= bounds[0]:
        usage_error(f"--period={text}: END must be after START")
    return bounds[0], bounds[1]


def _ppm(name: str, share: float) -> int:
    if not 0.0 <= share <= 1.0:
        usage_error(f"--{name}={share} is not allowed: must be in [0, 1]")
    return round(share * payout_lib.PPM)


def payout(f: flags.FlagValues) -> None:
    """Writes the period's signed payout statement (and CSV) for a contributor run."""
    for name in ("usage", "store", "run", "period", "key", "out"):
        if not f[name].value:
            usage_error(f"payout needs --{name}")
    start, end = _period(f.period)
    host_ppm, holders_ppm = _ppm("host_share", f.host_share), _ppm("holders_share", f.holders_share)
    if host_ppm + holders_ppm > payout_lib.PPM:
        usage_error("--host_share + --holders_share must be at most 1")
    if not os.path.isfile(f.usage):
        usage_error(f"--usage={f.usage}: no such file")
    try:
        signer = identity.load(f.key)
    except identity.IdentityError as e:
        usage_error(f"--key={f.key}: {e}")
    try:
        store = ObjectStore.open(f.store)
    except StoreError as e:
        usage_error(str(e))
    try:
        totals = usage_verify.period_totals(f.usage, start, end)
        stmt = payout_lib.statement(
            store,
            f.run,
            period=(start, end),
            revenue=totals["revenue"],
            requests=totals["requests"],
            usage_head=totals["head_hash"] or "",
            host=f.host_name,
            host_ppm=host_ppm,
            holders_ppm=holders_ppm,
            identity=signer,
        )
    except (usage.UsageError, payout_lib.PayoutError, ProtocolError, StoreError) as e:
        _fail(one_line(e))
    except ValueError as e:
        usage_error(one_line(e))
    atomic_write(f.out, (json.dumps(stmt, indent=1) + "\n").encode())
    if f.csv:
        atomic_write(f.csv, payout_lib.to_csv(stmt).encode())
    print(payout_lib.to_csv(stmt), end="")
    print(
        f"{_PROG}: {totals['requests']} requests, revenue {stmt['revenue']} micro-units, "
        f"signed statement in {f.out}",
        file=sys.stderr,
    )


def _main(argv: list[str]) -> None:
    quiet_library_logs()
    args = argv[1:]
    command = args.pop(0) if args else "serve"
    if command not in COMMANDS:
        usage_error(f"unknown command {command!r}: the commands are {', '.join(COMMANDS)}")
    if args:
        usage_error(f"unexpected arguments: {' '.join(args)}")
    f = flags.FLAGS
    own = {name for names in FLAGS_OF.values() for name in names}
    for name in sorted(own - set(FLAGS_OF[command])):
        if f[name].present:
            allowed = " ".join(f"--{n}" for n in FLAGS_OF[command])
            usage_error(f"--{name} does not apply to {command} (it takes {allowed})")
    {"serve": serve, "keys": add_key, "verify": verify, "payout": payout}[command](f)


def main() -> None:
    """Console entry point."""
    if sys.argv and os.path.basename(sys.argv[0]) == "__main__.py":
        sys.argv[0] = _PROG
    cli.run(_main, define_flags)


if __name__ == "__main__":
    main()
