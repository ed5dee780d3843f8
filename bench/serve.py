"""Serving throughput: the server under 1, 8 and 32 concurrent clients vs one at a time.

    python3 bench/serve.py                        # CPU: configs/tiny.py's model shape
    python3 bench/serve.py --preset=gpu           # the 0.5B rung's shape, bf16 (an accelerator)
    python3 bench/serve.py --requests=64 --max_tokens=64 --concurrency=1,8,32

Random weights, the byte tokenizer, greedy decoding, EOS ignored (every request makes exactly
--max_tokens tokens, in the server and in the baseline). The server (`near_jax.serve.app`
with the continuous-batching engine, --slots slots) runs in this process on a local port;
N client threads, in a separate process (bench/serve_client.py, as real clients are), send
the same --requests completions (prompts of --prompt_len bytes), each client one request at
a time, over HTTP with the real JSON bodies, metering and signatures. The baseline serves
the same requests one after another with `Generator.generate` (no HTTP): what near_jax
offered before the server.

Reported per row (medians over --repeats runs of the row):
  output tok/s   completion tokens of all requests / wall time from the first send to the
                 last reply
  p50 / p99 s    per-request latency: send to last byte (the baseline: one generate call)
  speedup        output tok/s over the baseline's
Greedy outputs are compared with the baseline's: every reply must be the same text.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np

from near_jax import config as config_lib
from near_jax import model, sharding
from near_jax.contrib import identity
from near_jax.data.tokenizer import load_tokenizer
from near_jax.infer import loading
from near_jax.infer.generator import Generator
from near_jax.serve import app as serve_app
from near_jax.serve import attestation, engine, keys, metering, usage
from near_jax.train.step import resolve_config

REPO = Path(__file__).resolve().parents[1]
# Random weights draw the byte tokenizer's EOS early and at random, so requests would end
# after a few tokens: EOS is an ordinary token here, in both the server and the baseline (as
# vLLM's benchmarks' ignore_eos), and every request makes exactly --max_tokens tokens.
NO_EOS = -1


def _config_module(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_config", REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_config(preset: str, seq_len: int) -> tuple[model.ModelConfig, int]:
    """(model config, context) of a preset: configs/tiny.py, or the m500m rung in bf16."""
    if preset == "cpu":
        cfg = _config_module("tiny.py").get_config()
    else:
        cfg = _config_module("ladder.py").get_config("m500m")
        cfg.model.param_dtype = "bfloat16"  # serving weights: half the memory, as deployed
    cfg.data.seq_len = seq_len
    cfg = resolve_config(config_lib.validate(cfg), load_tokenizer("byte").vocab_size)
    return model.ModelConfig.from_config(cfg.model), seq_len


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class _Served:
    """A live server on a local port over `params`."""

    def __init__(self, params, mcfg, mesh, tok, context, slots, chunk, tmp):
        import uvicorn

        self.engine = engine.Engine(
            params,
            mcfg,
            mesh,
            eos_id=NO_EOS,
            pad_id=tok.pad_id,
            vocab_limit=tok.vocab_size,
            max_len=context,
            slots=slots,
            prefill_chunk=chunk,
            max_queue=4096,
        )
        self.engine.warmup()
        self.engine.start()
        self.ledger = usage.UsageLedger(str(Path(tmp) / "usage.sqlite"))
        service = serve_app.Service(
            engine=self.engine,
            tokenizer=tok,
            meter=metering.Meter(keys.KeyRing.open(), self.ledger),
            identity=identity.generate(),
            provider=attestation.provider("none"),
            model="bench",
            context=context,
            params_sha256="0" * 64,
            code_sha256=attestation.code_sha256(),
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
        # log_config=None: keep the process's logging as it is (uvicorn would point it at the
        # stderr of the moment, which a test harness closes later).
        config = uvicorn.Config(serve_app.Server(service).app(), log_config=None)
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]})
        self.thread.start()
        while not self.uv.started:
            time.sleep(0.05)

    def load(self, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[list, float]:
        """(results, wall seconds) of `prompts` sent by `concurrency` clients in another
        process (bench/serve_client.py): [text, completion tokens, seconds] per prompt, and
        the seconds from the first send to the last reply."""
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "bench" / "serve_client.py"),
                self.url,
                str(concurrency),
                str(max_tokens),
            ],
            input=json.dumps(prompts),
            capture_output=True,
            text=True,
            check=True,
        )
        out = json.loads(proc.stdout)
        return out["results"], out["wall"]

    def close(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)
        self.engine.shutdown()
        self.ledger.close()


def _row(name: str, tokens: int, wall: float, latencies: list[float]) -> dict:
    return {
        "mode": name,
        "tokens_per_s": tokens / wall,
        "p50_s": _percentile(latencies, 50),
        "p99_s": _percentile(latencies, 99),
        "wall_s": wall,
    }


def _median_row(rows: list[dict]) -> dict:
    out = dict(rows[0])
    for k in ("tokens_per_s", "p50_s", "p99_s", "wall_s"):
        out[k] = statistics.median(r[k] for r in rows)
    return out


def run(args: argparse.Namespace) -> list[dict]:
    """Every row: the baseline, then one per concurrency."""
    mcfg, context = _model_config(args.preset, args.context)
    tok = load_tokenizer("byte")
    mesh = loading.inference_mesh()
    with jax.set_mesh(mesh):
        params = model.init(mcfg, jax.random.key(0))
        shardings = sharding.logical_to_sharding(model.logical_axes(mcfg), params, mesh)
        params = jax.device_put(params, shardings)
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    prompts = ["".join(rng.choice(letters, args.prompt_len - 1)) for _ in range(args.requests)]

    # Baseline: one request at a time through `generate`.
    gen = Generator(
        params,
        mcfg,
        mesh,
        eos_id=NO_EOS,
        pad_id=tok.pad_id,
        vocab_limit=tok.vocab_size,
        max_len=context,
    )
    ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    gen.generate(ids[:1], max_new_tokens=args.max_tokens)  # compile
    baseline_rows, expected = [], []
    for _ in range(args.repeats):
        latencies, tokens, expected = [], 0, []
        start = time.perf_counter()
        for row in ids:
            t = time.perf_counter()
            out = gen.generate([row], max_new_tokens=args.max_tokens)
            latencies.append(time.perf_counter() - t)
            tokens += out.new_tokens
            expected.append(tok.decode(out.tokens[0]))
        baseline_rows.append(
            _row("generate, one at a time", tokens, time.perf_counter() - start, latencies)
        )
    rows = [_median_row(baseline_rows)]

    with tempfile.TemporaryDirectory() as tmp:
        served = _Served(params, mcfg, mesh, tok, context, args.slots, args.prefill_chunk, tmp)
        try:
            served.load(prompts[:1], 1, args.max_tokens)  # the first request's one-time costs
            for c in args.concurrency:
                measured = []
                for _ in range(args.repeats):
                    # Timed by the client process, from its first send to its last reply
                    # (its own start-up, ~0.05 s, would be 10% of a run here).
                    results, wall = served.load(prompts, c, args.max_tokens)
                    mismatches = sum(r[0] != e for r, e in zip(results, expected, strict=True))
                    row = _row(
                        f"server, {c} clients",
                        sum(r[1] for r in results),
                        wall,
                        [r[2] for r in results],
                    )
                    row["mismatches"] = mismatches
                    measured.append(row)
                rows.append(_median_row(measured) | {"concurrency": c})
        finally:
            served.close()
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=16, help="prompt bytes, BOS included")
    parser.add_argument("--max_tokens", type=int, default=48)
    parser.add_argument("--context", type=int, default=128, help="the model's context")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--prefill_chunk", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
        if min(args.concurrency) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--concurrency={args.concurrency}: a comma list of integers >= 1")
    if args.prompt_len + args.max_tokens > args.context:
        parser.error("--prompt_len + --max_tokens must fit in --context")
    rows = run(args)
    header = f"{'mode':<26} {'out tok/s':>10} {'p50 s':>8} {'p99 s':>8} {'speedup':>8} {'same':>5}"
    print(header)
    for r in rows:
        same = "-" if "mismatches" not in r else ("yes" if r["mismatches"] == 0 else "NO")
        print(
            f"{r['mode']:<26} {r['tokens_per_s']:>10.1f} {r['p50_s']:>8.3f} {r['p99_s']:>8.3f} "
            f"{r['speedup']:>7.2f}x {same:>5}"
        )
    result = {
        "bench": "serve",
        "preset": args.preset,
        "device": jax.devices()[0].device_kind,
        "requests": args.requests,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "slots": args.slots,
        "rows": rows,
    }
    print(json.dumps(result))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
