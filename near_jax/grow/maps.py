"""Where each unit of a grown model comes from: index maps for width and depth, and refusals.

All maps are small numpy arrays computed from the two model configs; `transform` applies
them to the params. Width has three kinds of units:

- residual-stream channels (`d_model`): in `clone`, target channel i copies source channel
  `src[i] = i % d` scaled by `scale[i] = sqrt(r / c)`, where r = d'/d and c is how many
  target channels copy that source channel. Then every RMSNorm sees the same mean square
  (sum of scale^2 over a channel's copies is r), so the grown model computes the same
  function for any d' >= d, not only whole multiples. In `zero`, channels past d are new
  and start at zero.
- MLP hidden units and attention heads: target unit i copies source unit `src[i]`; a
  reader of duplicated units divides by the copy count. In `zero`, only the first copy is
  the source unit; the rest are new (fresh input weights, zero output weights).
- key/value heads: always copies (j % G), so each query head finds its source's kv head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from near_jax.config import ModelConfig

WIDTHS = ("clone", "zero")
DEPTHS = ("stack", "identity")
NEW = -1  # in a map: a unit (or layer) that is new, not a copy of a source unit

# Which options give a grown model that computes the source's function at step 0.
PRESERVES_FUNCTION = {
    "clone": "yes (exactly, up to float rounding)",
    "zero": "yes, up to RMSNorm's epsilon (the norms see fewer live channels)",
    "identity": "yes (new blocks add zero to the residual stream)",
    "stack": "no (repeated blocks change the function; G_stack recovers it in training)",
}


class GrowError(ValueError):
    """Growth that cannot work (or options that do not exist); the message is one line."""


@dataclasses.dataclass(frozen=True)
class UnitMap:
    """Target unit i copies source unit `src[i]` (NEW: a fresh unit)."""

    src: np.ndarray  # int32 [target units]
    # How many target units copy each *source* unit (readers of copies divide by it).
    copies: np.ndarray  # int32 [source units]

    @property
    def first(self) -> np.ndarray:
        """Whether target unit i is the first copy of its source unit (bool)."""
        seen: set[int] = set()
        out = np.zeros(len(self.src), bool)
        for i, s in enumerate(self.src):
            if s != NEW and s not in seen:
                seen.add(int(s))
                out[i] = True
        return out


@dataclasses.dataclass(frozen=True)
class ResidualMap:
    """Residual channel i of the target = scale[i] x source channel src[i] (NEW: zero)."""

    src: np.ndarray  # int32 [d']
    scale: np.ndarray  # float64 [d']: writers multiply by it
    read: np.ndarray  # float64 [d']: readers multiply their input rows by it
    norm: float  # RMSNorm scales are multiplied by this


def _counts(src: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(src[src != NEW], minlength=n).astype(np.int32)


def residual_map(d: int, d_new: int, width: str) -> ResidualMap:
    """The residual-stream map for d -> d_new channels."""
    if width == "zero":
        src = np.where(np.arange(d_new) < d, np.arange(d_new), NEW).astype(np.int32)
        live = (src != NEW).astype(np.float64)
        # x' = [x, 0]: mean(x'^2) = mean(x^2) d/d', so the norms' scales shrink by sqrt(d/d').
        return ResidualMap(src, live, live, float(np.sqrt(d / d_new)))
    src = (np.arange(d_new) % d).astype(np.int32)
    copies = _counts(src, d)[src].astype(np.float64)
    ratio = d_new / d
    scale = np.sqrt(ratio / copies)
    # A reader sums the copies: sum over copies of scale * read = 1 when read = scale / ratio.
    return ResidualMap(src, scale, scale / ratio, 1.0)


def unit_map(n: int, n_new: int) -> UnitMap:
    """Hidden units n -> n_new: target unit i copies source unit i % n."""
    src = (np.arange(n_new) % n).astype(np.int32)
    return UnitMap(src, _counts(src, n))


def head_maps(cfg: ModelConfig, new: ModelConfig) -> tuple[UnitMap, UnitMap]:
    """(query-head map, kv-head map) that keep every query head with its own kv head.

    Target kv head j copies source kv head j % G. Target query head h (group j, slot t)
    copies a query head of source group j % G: copy c = j // G of that group takes slots
    (c * g' + t) % g, so the copies of a group together hold all g of its heads when there
    are enough of them. GrowError if some source head has no place.
    """
    h, g = cfg.n_heads, cfg.n_kv_heads
    h_new, g_new = new.n_heads, new.n_kv_heads
    group, group_new = h // g, h_new // g_new
    kv_src = (np.arange(g_new) % g).astype(np.int32)
    q_src = np.empty(h_new, np.int32)
    for head in range(h_new):
        j, t = divmod(head, group_new)
        q_src[head] = (j % g) * group + ((j // g) * group_new + t) % group
    q_map = UnitMap(q_src, _counts(q_src, h))
    if (q_map.copies == 0).any():
        raise GrowError(
            f"model.n_heads/n_kv_heads {h_new}/{g_new} cannot hold the source's {h}/{g}: "
            f"its {group_new} query heads per kv head x {g_new // g} copies of each kv head "
            f"place fewer than the source's {group} query heads per kv head"
        )
    return q_map, UnitMap(kv_src, _counts(kv_src, g))


def layer_order(n: int, n_new: int, depth: str) -> np.ndarray:
    """Source layer of each target layer (NEW: a fresh identity block).

    stack: the whole stack repeated (G_stack), the remainder from its top layers, so the
    model still ends with its last layers: 3 -> 8 is [0,1,2, 0,1,2, 1,2].
    identity: the source layers in order with the new blocks spread evenly among them,
    each after a source layer: 2 -> 5 is [0, new, 1, new, new].
    """
    if depth == "stack":
        times, rest = divmod(n_new, n)
        return np.array(list(range(n)) * times + list(range(n - rest, n)), np.int32)
    order: list[int] = []
    extra = n_new - n
    for layer in range(n):
        order.append(layer)
        order += [NEW] * ((layer + 1) * extra // n - layer * extra // n)
    return np.array(order, np.int32)


_SAME = {
    "vocab_size": "growth keeps the vocabulary (the token embedding rows)",
    "head_dim": (
        "heads keep their width (RoPE's frequencies are tied to head_dim); grow n_heads instead"
    ),
    "rope_theta": "a different RoPE base changes every attention score",
    "tie_embeddings": "the embedding and the output head must stay tied (or untied)",
    "norm_eps": "RMSNorm's epsilon is part of the function",
    "attention_window": "the attention span is part of the function",
}
_NO_SMALLER = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim")


def check_options(width: str, depth: str) -> None:
    """GrowError (one line) unless `width` and `depth` name growth options."""
    if width not in WIDTHS:
        raise GrowError(f"--width={width!r} is not allowed: one of {', '.join(WIDTHS)}")
    if depth not in DEPTHS:
        raise GrowError(f"--depth={depth!r} is not allowed: one of {', '.join(DEPTHS)}")


def check(cfg: ModelConfig, new: ModelConfig, width: str, depth: str) -> None:
    """GrowError (one line) unless `cfg` can be grown into `new` with these options."""
    check_options(width, depth)
    for key, why in _SAME.items():
        if getattr(cfg, key) != getattr(new, key):
            raise GrowError(
                f"model.{key} is {getattr(new, key)!r} in the target but "
                f"{getattr(cfg, key)!r} in the source: {why}"
            )
    for key in _NO_SMALLER:
        if getattr(new, key) < getattr(cfg, key):
            raise GrowError(
                f"the target is smaller: model.{key} is {getattr(new, key)} in the target, "
                f"{getattr(cfg, key)} in the source; growth only adds"
            )
    if all(getattr(new, key) == getattr(cfg, key) for key in _NO_SMALLER):
        raise GrowError(
            "the target has the source's shape: nothing to grow (start a run from it with "
            "--config.checkpoint.init_from instead)"
        )
    head_maps(cfg, new)  # raises if the heads have no place


def preserved(cfg: ModelConfig, new: ModelConfig, width: str, depth: str) -> dict[str, str]:
    """{option: whether the grown model computes the source's function}; an option whose
    dimension does not grow is "n/a (unchanged)"."""
    widens = any(getattr(cfg, k) != getattr(new, k) for k in _NO_SMALLER if k != "n_layers")
    deepens = cfg.n_layers != new.n_layers
    unchanged = "n/a (unchanged)"
    return {
        width: PRESERVES_FUNCTION[width] if widens else unchanged,
        depth: PRESERVES_FUNCTION[depth] if deepens else unchanged,
    }


def describe(cfg: ModelConfig, new: ModelConfig) -> dict[str, Any]:
    """What grows, for logs and the run's record: {field: [source, target]} of changed fields."""
    return {
        key: [getattr(cfg, key), getattr(new, key)]
        for key in _NO_SMALLER
        if getattr(cfg, key) != getattr(new, key)
    }
