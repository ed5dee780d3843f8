"""The aggregator of a contributor run, built from its config or manifest (`build`).

    agg = build(cfg, trainer, store, run, manifest, key_path=..., ledger_path=...)

`scoring_loss` is the validation loss contributions are scored with (the run's val split, or
a private source only the aggregator has); `diloco.assignment.loss_fn` the train loss of the
assigned-data check (`judging`). The aggregator program (`python -m near_jax.diloco.aggregator`)
calls `build` with its flags' values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from near_jax._io import one_line
from near_jax.config import ConfigError
from near_jax.contrib import attest, identity
from near_jax.contrib.policy import Policy, recipe_sha256
from near_jax.contrib.validator import ContribAggregator
from near_jax.diloco import assignment
from near_jax.diloco.aggregator import fixed_eval


def scoring_loss(trainer, num_batches: int, source: str = "") -> Callable[[Any, int], float]:
    """loss_fn(params, seed) for scoring: the trainer's eval loss on `num_batches` val
    batches drawn from `seed` (drawn once per seed: a round scores everything on them) —
    of the run's val split, or of a private `source` (see `fixed_eval`)."""
    cache: dict[int, Callable[[Any], float]] = {}

    def loss(params: Any, seed: int) -> float:
        if seed not in cache:
            cache.clear()
            cache[seed] = fixed_eval(trainer, num_batches, val_seed=seed, source=source)
        return cache[seed](params)

    return loss


def build(
    cfg,
    trainer,
    store,
    run: str,
    manifest: dict | None,
    *,
    key_path: str,
    ledger_path: str,
    score_source: str = "",
    allowlist: dict | None = None,
    **kwargs: Any,
) -> ContribAggregator:
    """The aggregator of a contributor run (the policy from the manifest once the run
    exists, else from `cfg.contrib`); ValueError (one line) for an unusable key or
    scoring source."""
    if not key_path:
        raise ValueError(
            "a contributor run needs the aggregator's key: --key=PATH (make one with "
            "python -m near_jax.contrib keygen --out=PATH)"
        )
    try:
        key = identity.load(key_path)
    except identity.IdentityError as e:
        raise ValueError(str(e)) from None
    if manifest is not None:
        policy = Policy.from_json(manifest["contrib"]["policy"])
        allowlist = manifest["contrib"].get("allowlist")  # fixed when the run was created
    else:
        policy = Policy.from_config(cfg.contrib, attest.code_sha256(), recipe_sha256(cfg))
    loss = scoring_loss(trainer, policy.score_batches, score_source)
    if score_source:  # fail now, with the source named, not in the first round
        try:
            loss(jax.device_get(trainer.init(jax.random.key(0)).params), 0)
        except (ConfigError, ValueError, OSError) as e:
            raise ValueError(f"--score_source={score_source}: {one_line(e)}") from None
    return ContribAggregator(
        store,
        run,
        trainer.abstract_state.params,
        aggregator_key=key,
        policy=policy,
        loss_fn=loss,
        ledger_path=ledger_path,
        train_loss_fn=assignment.loss_fn(trainer) if policy.assigned_data else None,
        allowlist=allowlist,
        **kwargs,
    )
