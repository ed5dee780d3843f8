"""Sampling from a trained run with a KV cache.

    python -m near_jax.generate --workdir=/tmp/near_jax_tiny --prompt="def main(" \
        --max_new_tokens=200 --temperature=0.8 --top_p=0.95

The prompts of a batch are right-padded to one length and prefilled in one jitted call; then
one jitted decode step per token samples every row at its own position (rows may have
different prompt lengths). Shapes are bucketed (prompt length to a multiple of 64, cache to a
multiple of 128) so repeated calls reuse compiled code. Params stay sharded on the mesh
(`--fsdp`, `--tensor`; data parallelism over the remaining devices splits the batch).

A request is checked before anything is allocated. Prompt plus new tokens must fit the
context the model was trained on, `data.seq_len`: RoPE attention has never seen a query-key
distance past it, so longer output is extrapolation, not sampling (a sliding-window model,
whose distances stay under `model.attention_window`, is bounded by memory only). And the KV
cache of the (bucketed) batch must fit in CACHE_MEMORY_FRACTION of the free memory of each
device (the rest is for prefill activations and logits).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from near_jax import model, sharding
from near_jax.infer import loading
from near_jax.infer.sampling import Sampling, sample

PROMPT_BUCKET = 64
CACHE_BUCKET = 128
# Rows check for "all finished" every few steps: each check waits for the device.
SYNC_EVERY = 8
# Share of a device's free memory the KV cache may take (see the module docstring).
CACHE_MEMORY_FRACTION = 0.8


@dataclasses.dataclass
class Generation:
    """What `Generator.generate` returns, one entry per prompt."""

    tokens: list[list[int]]  # new tokens, up to and excluding EOS
    finished: list[bool]  # the row stopped at EOS (else at max_new_tokens)
    prefill_seconds: float
    decode_seconds: float

    @property
    def new_tokens(self) -> int:
        return sum(len(t) + f for t, f in zip(self.tokens, self.finished, strict=True))

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.prefill_seconds + self.decode_seconds, 1e-9)


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, math.ceil(n / multiple) * multiple)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def _host_available_bytes() -> int:
    """MemAvailable of this host (free pages if /proc/meminfo is not there)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_device_memory(mesh: jax.sharding.Mesh) -> int:
    """Bytes free on the fullest device of this process in `mesh`.

    Accelerators report their allocator's limit and use; CPU devices report nothing and share
    the host's available memory.
    """
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    stats = [d.memory_stats() for d in local]
    if all(st and "bytes_limit" in st for st in stats):
        return min(st["bytes_limit"] - st.get("bytes_in_use", 0) for st in stats)
    return _host_available_bytes() // max(len(local), 1)


class Generator:
    """Jitted prefill and decode steps for one model, params and mesh."""

    def __init__(
        self,
        params: Any,
        model_cfg: model.ModelConfig,
        mesh: jax.sharding.Mesh,
        *,
        eos_id: int,
        pad_id: int,
        vocab_limit: int | None = None,
        max_len: int = 0,
        cache_budget_bytes: int | None = None,
    ):
        """`max_len`: tokens of prompt plus output at most (0 = no limit but memory);
        `cache_budget_bytes`: KV cache bytes per device at most (None = CACHE_MEMORY_FRACTION
        of the free memory at each request)."""
        self.params, self.model_cfg, self.mesh = params, model_cfg, mesh
        self.eos_id, self.pad_id = eos_id, pad_id
        self.max_len, self.cache_budget_bytes = max_len, cache_budget_bytes
        # Ids past the tokenizer's vocabulary (padding rows of the embedding) are never drawn.
        self.vocab_limit = vocab_limit or model_cfg.vocab_size
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=3)
        self._decode = jax.jit(self._decode_fn, static_argnums=6, donate_argnums=1)

    def _mask_vocab(self, logits_BxV: jax.Array) -> jax.Array:
        ids_V = jnp.arange(logits_BxV.shape[-1])
        return jnp.where(ids_V < self.vocab_limit, logits_BxV, -jnp.inf)

    def _prefill_fn(self, params, tokens_BxP, lengths_B, cache):
        positions_BxP = jnp.broadcast_to(jnp.arange(tokens_BxP.shape[1]), tokens_BxP.shape)
        last_Bx1 = (lengths_B - 1)[:, None]
        logits_Bx1xV, cache = model.apply_with_cache(
            params, tokens_BxP, positions_BxP, cache, self.model_cfg, select_BxT=last_Bx1
        )
        return self._mask_vocab(logits_Bx1xV[:, 0]), cache

    def _decode_fn(self, params, cache, logits_BxV, positions_B, done_B, rng, sampling):
        """Samples a token per row from `logits`, then runs it through the model."""
        token_B = sample(logits_BxV, rng, sampling)
        token_B = jnp.where(done_B, self.pad_id, token_B)
        done_B = done_B | (token_B == self.eos_id)
        logits_Bx1xV, cache = model.apply_with_cache(
            params, token_B[:, None], positions_B[:, None], cache, self.model_cfg
        )
        return token_B, done_B, self._mask_vocab(logits_Bx1xV[:, 0]), cache

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        sampling: Sampling | None = None,
        seed: int = 0,
    ) -> Generation:
        """Continues each prompt (token ids, BOS included) by up to `max_new_tokens` tokens.

        `sampling` defaults to greedy.
        """
        sampling = sampling or Sampling()
        batch, prompt_len, cache_len = self.check_request(prompts, max_new_tokens)
        n = len(prompts)
        tokens = np.full((batch, prompt_len), self.pad_id, np.int32)
        lengths = np.ones(batch, np.int32)  # padding rows: one pad token, output dropped
        for i, p in enumerate(prompts):
            tokens[i, : len(p)], lengths[i] = p, len(p)

        batch_sharding = sharding.batch_sharding(self.mesh)
        row_sharding = jax.sharding.NamedSharding(self.mesh, PartitionSpec(batch_sharding.spec[0]))
        with jax.set_mesh(self.mesh):
            cache = self._new_cache(batch, cache_len)
            start = time.perf_counter()
            logits, cache = self._prefill(
                self.params,
                jax.device_put(tokens, batch_sharding),
                jax.device_put(lengths, row_sharding),
                cache,
            )
            logits.block_until_ready()
            prefill_seconds = time.perf_counter() - start

            start = time.perf_counter()
            positions = jax.device_put(lengths, row_sharding)
            done = jax.device_put(np.zeros(batch, bool), row_sharding)
            rng = jax.random.key(seed)
            out = []
            for i in range(max_new_tokens):
                token, done, logits, cache = self._decode(
                    self.params,
                    cache,
                    logits,
                    positions,
                    done,
                    jax.random.fold_in(rng, i),
                    sampling,
                )
                out.append(token)
                positions = positions + 1
                if (i + 1) % SYNC_EVERY == 0 and bool(jnp.all(done)):
                    break
            out_BxT = np.asarray(jnp.stack(out, axis=1))
            decode_seconds = time.perf_counter() - start

        rows, finished = [], []
        for row in out_BxT[:n]:
            stop = np.flatnonzero(row == self.eos_id)
            finished.append(bool(stop.size))
            rows.append(row[: stop[0]].tolist() if stop.size else row.tolist())
        return Generation(rows, finished, prefill_seconds, decode_seconds)

    def check_request(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[int, int, int]:
        """Raises ValueError (one line) for a request this model and mesh cannot serve;
        returns its bucketed (batch, prompt length, cache length)."""
        if not prompts:
            raise ValueError("no prompts: pass at least one")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt: every prompt needs at least one token (BOS)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} is not allowed: must be >= 1")
        longest = max(len(p) for p in prompts)
        if self.max_len and longest + max_new_tokens > self.max_len:
            if longest >= self.max_len:
                raise ValueError(
                    f"a prompt of {longest} tokens is not allowed: the model's context is "
                    f"{self.max_len} tokens (data.seq_len), prompt and output together"
                )
            raise ValueError(
                f"max_new_tokens={max_new_tokens} is not allowed: at most "
                f"{self.max_len - longest} (the model's context of {self.max_len} tokens, "
                f"data.seq_len, less the longest prompt's {longest})"
            )
        batch = _round_up(len(prompts), sharding.data_parallel_size(self.mesh))
        prompt_len = _round_up(longest, PROMPT_BUCKET)
        cache_len = _round_up(prompt_len + max_new_tokens, CACHE_BUCKET)
        # The cache is linear in its length; price one bucket, then the request.
        per_bucket = self.cache_bytes_per_device(batch, CACHE_BUCKET)
        need = per_bucket * (cache_len // CACHE_BUCKET)
        budget = self.cache_budget_bytes
        if budget is None:
            budget = int(CACHE_MEMORY_FRACTION * free_device_memory(self.mesh))
        if need > budget:
            most = (budget // per_bucket) * CACHE_BUCKET - prompt_len
            raise ValueError(
                f"max_new_tokens={max_new_tokens} is not allowed: its KV cache needs "
                f"{_gib(need)} per device, over the {_gib(budget)} allowed; at most "
                f"{max(most, 0)} for {len(prompts)} prompt(s) of up to {longest} tokens"
            )
        return batch, prompt_len, cache_len

    def cache_bytes_per_device(self, batch: int, cache_len: int) -> int:
        """Bytes of the KV cache of `batch` rows and `cache_len` tokens on one device."""
        shapes, shardings = self._cache_layout(batch, cache_len)
        return sum(
            math.prod(shardings[k].shard_shape(v.shape)) * v.dtype.itemsize
            for k, v in shapes.items()
        )

    def _cache_layout(self, batch: int, cache_len: int):
        shapes = jax.eval_shape(lambda: model.init_cache(self.model_cfg, batch, cache_len))
        logical = {k: jax.sharding.PartitionSpec(*model.CACHE_AXES) for k in shapes}
        return shapes, sharding.logical_to_sharding(logical, shapes, self.mesh)

    @functools.cache  # noqa: B019 - one cache builder per shape; the generator lives long
    def _cache_builder(self, batch: int, cache_len: int):
        _, shardings = self._cache_layout(batch, cache_len)
        return jax.jit(
            lambda: model.init_cache(self.model_cfg, batch, cache_len), out_shardings=shardings
        )

    def _new_cache(self, batch: int, cache_len: int) -> dict[str, jax.Array]:
        return self._cache_builder(batch, cache_len)()


def context_len(run: loading.LoadedRun) -> int:
    """Tokens of prompt plus output a run's model can serve: its data.seq_len, or 0 (memory
    only) for sliding-window attention (see the module docstring)."""
    return 0 if run.model_cfg.attention_window else int(run.cfg.data.seq_len)


def generator_for_run(run: loading.LoadedRun) -> Generator:
    """A Generator over a loaded run, stopping at its tokenizer's EOS, bounded by its context."""
    tok = run.tokenizer
    return Generator(
        run.params,
        run.model_cfg,
        run.mesh,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        vocab_limit=tok.vocab_size,
        max_len=context_len(run),
    )


# ----------------------------------------------------------------------------- command line
