"""Held-out loss, perplexity and bits per byte of a model on whole documents.

Documents come from the run's validation split (`data.val_fraction` of its source), or from
any other source given in `data.source` (then every document of it is held out). They are
taken in a fixed pseudo-random order (by the hash of their identity) until at least
`max_tokens` target tokens are collected; a document is always scored whole, so the last
one may go over.

A document is tokenized as in training, [bos] + text + [eos]. A document longer than one row
is cut into pieces of `seq_len + 1` tokens that overlap by one token, so every text token is
a target exactly once; positions restart at 0 in each piece, as the training packer does.
Pieces are packed into rows with `segment_ids`, so attention never crosses a piece.

Only text tokens count: loss is the mean negative log-likelihood (nats) of the document's
text tokens, not of the final eos, and bits per byte = total nats / ln 2 / the number of UTF-8
bytes of the texts. Because bytes do not depend on the tokenizer, runs with different
tokenizers compare on bits per byte. Pre-tokenized (`.bin`) documents have no text: every
token counts and bits per byte is not defined (None).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import ml_collections
import numpy as np

from near_jax import model, sharding
from near_jax.config import ConfigError
from near_jax.data.documents import list_documents, split_documents
from near_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class HeldOut:
    """Packed rows of held-out documents, ready to score."""

    rows: dict[str, np.ndarray]  # inputs/targets/positions/segment_ids/weights, [R, seq_len]
    docs: int
    tokens: int  # target tokens that count (weight 1)
    bytes: int | None  # UTF-8 bytes of the texts; None for pre-tokenized documents
    source: str


def _document_ids(data_cfg: ml_collections.ConfigDict, all_docs: bool):
    docs = list_documents(data_cfg)
    ids = np.arange(len(docs)) if all_docs else split_documents(docs, "val", data_cfg.val_fraction)
    order = np.argsort(docs.hashes()[ids], kind="stable")
    return docs, ids[order]


def _pieces(tokens: np.ndarray, weights: np.ndarray, row_len: int):
    """Cuts a document into pieces of <= row_len tokens overlapping by one token."""
    step = row_len - 1
    for start in range(0, max(len(tokens) - 1, 1), step):
        yield tokens[start : start + row_len], weights[start : start + row_len]


def _pack(pieces: list[tuple[np.ndarray, np.ndarray]], row_len: int, pad_id: int) -> dict:
    """Packs pieces into rows of row_len tokens (next-fit) -> the model's [R, row_len-1] rows."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    fill = 0
    for piece in pieces:
        if fill + len(piece[0]) > row_len:
            rows.append([])
            fill = 0
        rows[-1].append(piece)
        fill += len(piece[0])
    n = len(rows)
    tokens = np.full((n, row_len), pad_id, np.int32)
    segs = np.zeros((n, row_len), np.int32)
    positions = np.zeros((n, row_len), np.int32)
    weights = np.zeros((n, row_len), np.float32)
    for r, row in enumerate(rows):
        at = 0
        for s, (toks, w) in enumerate(row, start=1):
            span = slice(at, at + len(toks))
            tokens[r, span], segs[r, span], weights[r, span] = toks, s, w
            positions[r, span] = np.arange(len(toks))
            at += len(toks)
    same_piece = (segs[:, :-1] == segs[:, 1:]) & (segs[:, 1:] != 0)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": positions[:, :-1],
        "segment_ids": segs[:, :-1],
        "weights": (weights[:, 1:] * same_piece).astype(np.float32),
    }


def load_heldout(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    *,
    max_tokens: int,
    all_docs: bool = False,
) -> HeldOut:
    """Reads, tokenizes and packs held-out documents (see the module docstring).

    `all_docs`: every document of `data_cfg.source` (a dedicated eval set) instead of its
    validation split.
    """
    docs, ids = _document_ids(data_cfg, all_docs)
    row_len = int(data_cfg.seq_len) + 1
    pieces, n_docs, n_tokens, n_bytes = [], 0, 0, 0
    has_text = True
    for i in ids:
        i = int(i)
        tokens = docs.read_tokens(i, tokenizer)
        if len(tokens) < 2:
            continue
        weights = np.ones(len(tokens), np.float32)
        if docs.kinds[docs.locate(i)[0]] == "bin":
            has_text = False
        else:
            weights[0] = weights[-1] = 0.0  # bos is never a target; eos has no bytes
            n_bytes += len(docs.read_text(i).encode("utf-8"))
        pieces.extend(_pieces(tokens, weights, row_len))
        n_docs += 1
        n_tokens += int(weights[1:].sum())
        if n_tokens >= max_tokens:
            break
    if not pieces:
        raise ConfigError(
            f"config.data.source={data_cfg.source!r} is not allowed: no held-out document to "
            "evaluate (every document is empty)"
        )
    return HeldOut(
        rows=_pack(pieces, row_len, tokenizer.pad_id),
        docs=n_docs,
        tokens=n_tokens,
        bytes=n_bytes if has_text else None,
        source=str(data_cfg.source),
    )


@functools.cache
def _scorer(model_cfg: model.ModelConfig, mesh: jax.sharding.Mesh):
    def score(params, batch):
        _, aux = model.loss_fn(params, batch, model_cfg)
        return aux["xent"] * aux["weight"], aux["weight"]

    repl = sharding.replicated(mesh)
    return jax.jit(score, out_shardings=(repl, repl))


def evaluate_heldout(
    params: Any,
    model_cfg: model.ModelConfig,
    mesh: jax.sharding.Mesh,
    heldout: HeldOut,
    *,
    batch_size: int = 16,
) -> dict[str, Any]:
    """loss, perplexity, bits_per_byte (None without text), tokens, bytes, docs."""
    dp = sharding.data_parallel_size(mesh)
    batch_size = math.ceil(batch_size / dp) * dp
    rows = heldout.rows
    n = rows["inputs"].shape[0]
    score = _scorer(model_cfg, mesh)
    data_sharding = sharding.batch_sharding(mesh)
    nats, weight = 0.0, 0.0
    with jax.set_mesh(mesh):
        for lo in range(0, n, batch_size):
            batch = {}
            for key, x in rows.items():
                chunk = np.zeros((batch_size, x.shape[1]), x.dtype)  # padding rows weigh 0
                chunk[: min(batch_size, n - lo)] = x[lo : lo + batch_size]
                batch[key] = jax.device_put(chunk, data_sharding)
            s, w = score(params, batch)
            nats, weight = nats + float(s), weight + float(w)
    loss = nats / max(weight, 1.0)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": nats / math.log(2) / heldout.bytes if heldout.bytes else None,
        "tokens": int(round(weight)),
        "bytes": heldout.bytes,
        "docs": heldout.docs,
    }
