"""Hugging Face interop: Llama-format safetensors in and out.

convert    the parameter mapping (`params_to_hf`, `params_from_hf`), config translation, refusals
exchange   export a run to a HF directory, import a HF directory as a run (atomic, sharded)
__main__   `python -m near_jax.hf export|import`: flags and main

The package re-exports both modules' public functions (`from near_jax.hf import params_to_hf`).
"""

from near_jax.hf.convert import (
    DTYPES,
    HFError,
    iter_hf_tensors,
    llama_config,
    model_overrides,
    params_from_hf,
    params_to_hf,
)
from near_jax.hf.exchange import Written, export_run, import_hf

__all__ = [
    "DTYPES",
    "HFError",
    "Written",
    "export_run",
    "import_hf",
    "iter_hf_tensors",
    "llama_config",
    "model_overrides",
    "params_from_hf",
    "params_to_hf",
]
