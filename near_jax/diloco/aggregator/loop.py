"""The aggregator's run: version 0 from the config, then rounds until the run's end.

    created = create_run(agg, trainer, cfg, rounds=100)   # no-op (False) if the run exists
    agg.load()
    aggregate(agg, trainer, rounds=100, created=created, eval_batches=2, workdir=DIR)

`agg` is any `Aggregator` (contributor runs: contrib's validator-built one); the program
(`python -m near_jax.diloco.aggregator`) builds it from its flags. `fixed_eval` is the
validation loss of host params on fixed batches (contrib scores contributions with it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from near_jax import data
from near_jax.diloco import outer, protocol
from near_jax.diloco.aggregator.core import Aggregator
from near_jax.diloco.startup import manifest_fields
from near_jax.train import metrics
from near_jax.train.checkpoint_reads import restore_params


def fixed_eval(
    trainer, num_batches: int, val_seed: int | None = None, source: str = ""
) -> Callable[[Any], float] | None:
    """Mean validation loss of host params on `num_batches` fixed val batches (None if 0);
    `val_seed` draws other val batches, and with `source` (a data source only this
    machine has) batches of that source drawn from `val_seed` (contribution scoring)."""
    if num_batches <= 0:
        return None
    cfg = trainer.cfg
    if source:  # private: its whole train split is held out from every contributor
        data_cfg = cfg.data.copy_and_resolve_references()
        data_cfg.source = source
        it = data.make_iterator(
            data_cfg,
            split="train",
            seed=val_seed or 0,
            global_batch_size=cfg.train.global_batch_size,
        )
    else:
        it = data.make_iterator(
            cfg.data,
            split="val",
            seed=cfg.seed,
            global_batch_size=cfg.train.global_batch_size,
            val_seed=val_seed,
        )
    batches = [data.to_global_batch(next(it), trainer.batch_sharding) for _ in range(num_batches)]
    shardings = trainer.state_shardings.params
    dtypes = jax.tree.map(lambda a: a.dtype, trainer.abstract_state.params)

    def evaluate(params: Any) -> float:
        params = jax.tree.map(lambda x, d: x.astype(d), params, dtypes)
        params = jax.device_put(params, shardings)
        total = weight = 0.0
        for batch in batches:
            s, w = jax.device_get(trainer.eval_step(params, batch))
            total, weight = total + float(s), weight + float(w)
        return total / max(weight, 1.0)

    return evaluate


def outer_settings(cfg, manifest: dict | None) -> dict:
    """spec, lr, momentum of the run: its manifest's once it exists, else the config's."""
    if manifest is not None:
        lr, momentum = manifest["outer_lr"], manifest["outer_momentum"]
        return {"spec": manifest["compression"], "lr": lr, "momentum": momentum}
    resolved = outer.settings(cfg.diloco.to_dict())
    return {"spec": cfg.diloco.compression, "lr": resolved.lr, "momentum": resolved.momentum}


def create_run(agg: Aggregator, trainer, cfg, *, rounds: int) -> bool:
    """Creates the run at version 0 with the params `near_jax.train` would start from:
    `cfg.checkpoint.init_from`'s (a trained or grown run: the ladder's next rung) or else
    fresh from `cfg.seed`. True if this call created it (ValueError: its manifest is not
    storable; CheckpointError: init_from cannot be read)."""
    started: dict[str, Any] = {}
    if cfg.checkpoint.init_from:
        step, params = restore_params(cfg.checkpoint.init_from, trainer.abstract_state.params)
        params0 = jax.device_get(params)
        started = {"init_from": {"run": cfg.checkpoint.init_from, "step": step}}
    else:
        params0 = jax.device_get(trainer.init(jax.random.key(cfg.seed)).params)
    settings = outer.settings(cfg.diloco)
    info = {
        **started,
        **manifest_fields(cfg),
        "seed": cfg.seed,
        "rounds": rounds,
        "inner_steps": cfg.diloco.inner_steps,
        # Islands read these two: how their error feedback decays (the lr and momentum the
        # aggregator applies are recorded by Aggregator.create).
        "outer_optimizer": settings.optimizer,
        "feedback_decay": settings.feedback_decay,
        "quorum": agg.quorum,
        "round_timeout": agg.round_timeout,
        "num_params": protocol.num_elements(agg.like),
    }
    info.update(agg.manifest_fields())
    return agg.create(params0, info)


def aggregate(
    agg: Aggregator,
    trainer,
    *,
    rounds: int,
    created: bool,
    eval_batches: int,
    workdir: str | None = None,
) -> None:
    """Closes rounds of the loaded `agg` until version `rounds`, then marks the run finished;
    logs each round through `agg.log` and `workdir`/metrics.jsonl. Raises ProtocolError or
    StoreError when the store cannot go on; closes `agg` in the end."""
    run, store, state, log = agg.run, agg.store, agg.state, agg.log
    evaluate = fixed_eval(trainer, eval_batches)
    writer = metrics.MetricsWriter(workdir) if workdir else None
    log(
        f"run {run!r} {'created' if created else 'resumed'} at version {state.version} in "
        f"{store.url} | {protocol.num_elements(agg.like) / 1e6:.2f}M params | spec {agg.spec} | "
        f"quorum {agg.quorum} | timeout {agg.round_timeout:g}s"
    )
    try:
        if created and evaluate and writer:
            writer.write(0, {"version": 0, "eval_loss": evaluate(agg.params())}, "aggregator")
        while agg.state.version < rounds:
            stats = agg.run_round()
            decision = stats.pop("decision")
            if evaluate:
                stats["eval_loss"] = evaluate(agg.params())
            reason = stats.pop("reason")
            if "contrib" in decision:
                stats.update(contrib_stats(decision))
            if writer:
                writer.write(stats["round"], stats, "aggregator")
            late = ", ".join(f"{e['island']}@{e['round']}" for e in decision["late"])
            rejected = "; ".join(f"{e['island']}: {e['reason']}" for e in decision["rejected"])
            log(
                f"round {stats['round']} -> version {stats['version']} ({reason}"
                f"{', replayed' if stats['replayed'] else ''}) | accepted "
                f"{','.join(e['island'] for e in decision['accepted']) or '-'} | late "
                f"{late or '-'} | rejected {rejected or '-'} | outer {stats['outer_step_s']:.3f}s"
                f" | read {stats['bytes_read']} B written {stats['bytes_written']} B"
                + (f" | eval loss {stats['eval_loss']:.4f}" if evaluate else "")
                + (f" | best score {stats['best_score']:.4g}" if "best_score" in stats else "")
            )
        agg.finish()
        log(f"run {run!r} finished at version {agg.state.version}")
    finally:
        if writer:
            writer.close()
        agg.close()


def contrib_stats(decision: dict) -> dict:
    """Per-round metrics of a contributor run: base loss, best and mean accepted score."""
    scores = [e["score"] for e in decision["contrib"]["entries"] if e["accepted"]]
    out = {"contributions": len(decision["contrib"]["entries"])}
    if decision["contrib"]["base_loss"] is not None:
        out["score_base_loss"] = decision["contrib"]["base_loss"]
    if scores:
        out["best_score"], out["mean_score"] = max(scores), sum(scores) / len(scores)
    return out
