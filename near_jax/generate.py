"""Sample text from a trained run: `python -m near_jax.generate --workdir=RUN --prompt=...`.

The program's flags and `main`; generation itself is `near_jax.infer.generator`."""

from __future__ import annotations

import json
import sys

from absl import flags

from near_jax import cli
from near_jax.cli import quiet_library_logs, usage_error
from near_jax.infer import loading
from near_jax.infer.generator import generator_for_run
from near_jax.infer.sampling import Sampling


def define_flags() -> None:
    """The flags of `python -m near_jax.generate` (defined at launch)."""
    flags.DEFINE_string("workdir", None, "Run directory to sample from (its checkpoints).")
    flags.DEFINE_integer("step", None, "Checkpoint step; default the latest committed.")
    flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for a batch.")
    flags.DEFINE_string("prompts_file", None, "A file of prompts, one per line (\\n escapes).")
    flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt at most.")
    flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 = all.")
    flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass; 1 = off.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    loading.define_mesh_flags()
    flags.DEFINE_enum("format", "text", ["text", "jsonl"], "Output: text or one JSON per line.")


def _read_prompts(values: list[str], path: str | None) -> list[str]:
    prompts = list(values)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
        except OSError as e:
            usage_error(f"--prompts_file={path!r}: {e.strerror or e}")
        prompts += [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        usage_error("no prompt: pass --prompt=TEXT (repeatable) or --prompts_file=FILE")
    return prompts


def _main(argv: list[str]) -> None:
    quiet_library_logs()
    if len(argv) > 1:
        usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if not f.workdir:
        usage_error("--workdir is required: the run directory to sample from")
    prompts = _read_prompts(f.prompt, f.prompts_file)
    try:
        sampling = Sampling(f.temperature, f.top_k, f.top_p)
    except ValueError as e:
        usage_error(str(e))
    if f.max_new_tokens < 1:
        usage_error(f"--max_new_tokens={f.max_new_tokens} is not allowed: must be >= 1")
    try:
        run = loading.load_run(f.workdir, f.step, loading.inference_mesh(f.fsdp, f.tensor))
    except loading.CheckpointUnreadable as e:  # damaged data, not a usage mistake: exit 1
        print(f"near_jax.generate: error: {e}", file=sys.stderr)
        sys.exit(1)
    except loading.RunError as e:
        usage_error(str(e))
    tok = run.tokenizer
    ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    generator = generator_for_run(run)
    try:
        generator.check_request(ids, f.max_new_tokens)  # before any memory is allocated
    except ValueError as e:
        usage_error(str(e))
    result = generator.generate(
        ids, max_new_tokens=f.max_new_tokens, sampling=sampling, seed=f.seed
    )
    for i, (prompt, new) in enumerate(zip(prompts, result.tokens, strict=True)):
        text = tok.decode(new)
        if f.format == "jsonl":
            record = {
                "prompt": prompt,
                "completion": text,
                "tokens": len(new),
                "eos": result.finished[i],
            }
            print(json.dumps(record, ensure_ascii=False))
        else:
            end = " [eos]" if result.finished[i] else ""
            print(f"--- {i}\n{prompt}{text}{end}")
    print(
        f"step {run.step} | {len(prompts)} prompts | {result.new_tokens} new tokens in "
        f"{result.prefill_seconds + result.decode_seconds:.2f} s "
        f"({result.tokens_per_second:.1f} tokens/s; prefill {result.prefill_seconds:.2f} s, "
        "first call includes compilation)",
        file=sys.stderr,
    )


def main() -> None:
    """Console entry point."""
    cli.run(_main, define_flags)


if __name__ == "__main__":
    main()
