"""`python -m near_jax.hf export|import`: runs to and from Hugging Face format."""

from __future__ import annotations

import sys

from near_jax import cli
from near_jax._io import one_line
from near_jax.cli import quiet_library_logs, usage_error
from near_jax.hf.convert import DTYPES, HFError

# Re-exported, so `from near_jax.hf import params_to_hf` works (`X as X` marks a re-export).
from near_jax.hf.convert import llama_config as llama_config
from near_jax.hf.convert import model_overrides as model_overrides
from near_jax.hf.convert import params_from_hf as params_from_hf
from near_jax.hf.convert import params_to_hf as params_to_hf
from near_jax.hf.exchange import export_run, import_hf
from near_jax.infer import loading
from near_jax.train import checkpoint

_FLAGS_OF = {
    "export": ("workdir", "step", "out", "dtype", "max_shard_size"),
    "import": ("hf_dir", "workdir", "dtype"),
}
_WORKDIR_IS = {"export": "the run directory to export", "import": "the run directory to write"}


def define_flags() -> None:
    """Defines the flags (at launch, so importing this module defines none)."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "export: the run to read; import: the run to write.")
    flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest).")
    flags.DEFINE_string("out", None, "export: the HF directory to write (absent or empty).")
    flags.DEFINE_string("hf_dir", None, "import: the HF Llama directory to read.")
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Dtype of the written weights.")
    flags.DEFINE_string("max_shard_size", "5GB", "export: largest safetensors file.")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _main(argv: list[str]) -> None:
    from absl import flags

    quiet_library_logs()
    commands = " | ".join(_FLAGS_OF)
    if len(argv) != 2 or argv[1] not in _FLAGS_OF:
        got = " ".join(argv[1:]) or "nothing"
        usage_error(f"expected one command, {commands}; got {got}")
    command, f = argv[1], flags.FLAGS
    for name in set().union(*_FLAGS_OF.values()) - set(_FLAGS_OF[command]):
        if f[name].present:
            allowed = ", ".join(f"--{n}" for n in _FLAGS_OF[command])
            usage_error(f"--{name} is not a flag of {command}; its flags: {allowed}")
    if not f.workdir:
        usage_error(f"--workdir is required: {_WORKDIR_IS[command]}")
    try:
        if command == "export":
            written = export_run(f.workdir, f.out, f.step, f.dtype, f.max_shard_size)
            print(
                f"wrote {written.path}: {written.files} files, {written.params:,} params, "
                f"{_mb(written.bytes)} ({f.dtype})"
            )
        else:
            written = import_hf(f.hf_dir, f.workdir, f.dtype)
            print(
                f"wrote {written.path}: checkpoint at step 0, {written.params:,} params, "
                f"{_mb(written.bytes)} ({f.dtype}); train it in place with "
                f"--workdir={written.path}, or start another run from it with "
                f"--config.checkpoint.init_from={written.path}"
            )
    except (OSError, checkpoint.CheckpointError, loading.CheckpointUnreadable) as e:
        print(f"near_jax.hf: {command} failed: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except (HFError, loading.RunError) as e:
        usage_error(str(e))


def main() -> None:
    """Console entry point."""
    cli.run(_main, define_flags)


if __name__ == "__main__":
    main()
