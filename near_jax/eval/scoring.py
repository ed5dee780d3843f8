"""Scoring requests by log-likelihood under the model, in padded, bucketed batches.

A request's tokens are [bos] + encode(prompt) + encode(continuation), the two
encoded separately so the continuation's tokens are exactly its own. The model reads all
tokens but the last; if that is longer than `max_len` it is cut from the left, always keeping
the whole continuation (one longer than max_len is an error). loglikelihood = the sum of
log p(continuation token | all before it); is_greedy = every continuation token is the
model's argmax. Requests are sorted by length and padded (padding has segment_id 0) to
`batch_size` rows of a power-of-two length (at least 16, at most max_len), so jit compiles
only a few shapes. Progress is reported only through an optional `progress(done, total)`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from near_jax import model, sharding
from near_jax.data.tokenizer import Tokenizer
from near_jax.eval.prompts import Request
from near_jax.eval.taskfile import TaskError

MIN_BUCKET = 16  # the shortest padded row length, so tiny requests share one shape

Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class Score:
    """The model's verdict on one request."""

    loglikelihood: float
    is_greedy: bool


def encode_request(
    tokenizer: Tokenizer, request: Request, max_len: int, prompt_ids: list[int] | None = None
) -> tuple[np.ndarray, int]:
    """Token ids of a request, cut from the left to `max_len` + 1, and the continuation length.

    The model reads ids[:-1] and is scored on the last n_continuation of ids[1:].
    `prompt_ids` (the encoded prompt) may be passed to skip encoding it again.
    """
    if prompt_ids is None:
        prompt_ids = tokenizer.encode(request.prompt)
    continuation_ids = tokenizer.encode(request.continuation)
    n = len(continuation_ids)
    if n == 0 or n > max_len:
        raise TaskError(
            f"example {request.example} choice {request.choice}: the continuation "
            f"{request.continuation!r} is {n} tokens; it must be 1..max_len={max_len}"
        )
    ids = [tokenizer.bos_id, *prompt_ids, *continuation_ids][-(max_len + 1) :]
    return np.asarray(ids, np.int32), n


def bucket_length(length: int, max_len: int) -> int:
    """The padded row length for `length` tokens: a power of two >= MIN_BUCKET, <= max_len."""
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_len)


@functools.partial(jax.jit, static_argnames="cfg")
def score_rows(
    params: Any,
    tokens_BxL: jax.Array,
    positions_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    targets_BxL: jax.Array,
    mask_BxL: jax.Array,
    cfg: model.ModelConfig,
) -> tuple[jax.Array, jax.Array]:
    """Per row: the summed log p(target) over masked positions, and whether all are argmax."""
    args = (params, tokens_BxL, positions_BxL, segment_ids_BxL, cfg)
    if cfg.loss_chunk:  # the head chunk by chunk: no [B, L, V] logits (model.xent)
        head_DxV = model.head_weights(params, cfg.tie_embeddings)
        log_z_BxL, target_logit_BxL, hit_BxL = model.chunked_scores(
            model.hidden(*args), head_DxV, targets_BxL, cfg.loss_chunk, cfg.dtype
        )
    else:
        logits_BxLxV = model.apply(*args)
        # logit[target] - logsumexp avoids materializing a second [B, L, V] log_softmax.
        log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
        target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], -1)[..., 0]
        hit_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
    # where, not multiply: a padding position's logits may be anything, NaN included.
    logprob_B = jnp.where(mask_BxL, target_logit_BxL - log_z_BxL, 0.0).sum(axis=-1)
    greedy_B = jnp.all(hit_BxL | ~mask_BxL, axis=-1)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # replicated, so every process can read the results
        replicated = NamedSharding(mesh, PartitionSpec())
        logprob_B = jax.lax.with_sharding_constraint(logprob_B, replicated)
        greedy_B = jax.lax.with_sharding_constraint(greedy_B, replicated)
    return logprob_B, greedy_B


def pack_rows(
    encoded: Sequence[tuple[np.ndarray, int]], num_rows: int, length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Right-padded [num_rows, length] arrays for `score_rows`; padding has segment_id 0."""
    tokens_BxL = np.full((num_rows, length), pad_id, np.int32)
    targets_BxL = np.zeros((num_rows, length), np.int32)
    positions_BxL = np.zeros((num_rows, length), np.int32)
    segment_ids_BxL = np.zeros((num_rows, length), np.int32)
    mask_BxL = np.zeros((num_rows, length), bool)
    for row, (ids, n_cont) in enumerate(encoded):
        n = len(ids) - 1
        tokens_BxL[row, :n], targets_BxL[row, :n] = ids[:-1], ids[1:]
        positions_BxL[row, :n] = np.arange(n)
        segment_ids_BxL[row, :n] = 1
        mask_BxL[row, n - n_cont : n] = True
    return dict(
        tokens_BxL=tokens_BxL,
        positions_BxL=positions_BxL,
        segment_ids_BxL=segment_ids_BxL,
        targets_BxL=targets_BxL,
        mask_BxL=mask_BxL,
    )


def score_requests(
    params: Any,
    model_cfg: model.ModelConfig,
    tokenizer: Tokenizer,
    requests: Sequence[Request],
    *,
    max_len: int,
    batch_size: int = 32,
    mesh: jax.sharding.Mesh | None = None,
    progress: Progress | None = None,
) -> list[Score]:
    """Scores every request (see the module docstring), returned in the order given.

    With a `mesh`, rows are sharded over its data-parallel axes (batch_size is rounded up to
    a multiple of them) and the model traces under it. `progress(done, total)` is called after
    each batch.
    """
    if max_len < 1 or batch_size < 1:
        raise TaskError(f"max_len={max_len}, batch_size={batch_size}: both must be >= 1")
    model_cfg = model.ModelConfig.from_config(model_cfg)  # hashable: a static jit argument
    if mesh is not None:
        dp = sharding.data_parallel_size(mesh)
        batch_size = -(-batch_size // dp) * dp
    encoded = _encode_all(tokenizer, requests, max_len)
    # Longest first: the largest shape compiles and allocates first, so OOM shows at once.
    order = sorted(range(len(requests)), key=lambda i: -len(encoded[i][0]))
    scores: list[Score | None] = [None] * len(requests)
    pending = None  # one batch in flight: the host packs the next while the device runs
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        length = bucket_length(max(len(encoded[i][0]) - 1 for i in rows), max_len)
        arrays = pack_rows([encoded[i] for i in rows], batch_size, length, tokenizer.pad_id)
        outputs = _run_batch(params, model_cfg, arrays, mesh)
        if pending is not None:
            _collect(pending, scores, progress, len(requests))
        pending = (rows, outputs, start + len(rows))
    if pending is not None:
        _collect(pending, scores, progress, len(requests))
    return scores  # type: ignore[return-value]


def _encode_all(
    tokenizer: Tokenizer, requests: Sequence[Request], max_len: int
) -> list[tuple[np.ndarray, int]]:
    """Encodes every request; the choices of an example share one encoding of its prompt."""
    encoded, last_prompt, prompt_ids = [], None, []
    for request in requests:
        if request.prompt != last_prompt:  # build_requests puts an example's choices together
            last_prompt, prompt_ids = request.prompt, tokenizer.encode(request.prompt)
        encoded.append(encode_request(tokenizer, request, max_len, prompt_ids))
    return encoded


def _run_batch(params, model_cfg, arrays: dict[str, np.ndarray], mesh) -> tuple:
    """Dispatches `score_rows` on one packed batch (asynchronously)."""
    if mesh is None:
        return score_rows(params, **arrays, cfg=model_cfg)
    batch_sharding = sharding.batch_sharding(mesh)
    placed = {k: jax.device_put(v, batch_sharding) for k, v in arrays.items()}
    # Tracing must see the mesh so the model's activation constraints apply.
    with jax.set_mesh(mesh):
        return score_rows(params, **placed, cfg=model_cfg)


def _collect(pending, scores: list, progress: Progress | None, total: int) -> None:
    """Waits for one batch's outputs and stores them at their requests' original indices."""
    rows, outputs, done = pending
    logprob_B, greedy_B = jax.device_get(outputs)
    for row, i in enumerate(rows):
        scores[i] = Score(float(logprob_B[row]), bool(greedy_B[row]))
    if progress is not None:
        progress(done, total)
