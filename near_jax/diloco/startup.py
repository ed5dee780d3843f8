"""What both DiLoCo programs check before their loops: arguments, config, store, run.

The island and the aggregator (`python -m near_jax.diloco.island|aggregator`) share the
flags defined here and the checks that turn them into (config, mesh, store, manifest). Each
check raises `UsageError` with one line; the programs print it and exit 2.

    run = check_args(argv, store=..., run=..., poll_seconds=..., link=...)
    cfg, mesh, store, manifest = open_run(cfg, store_url, run, workdir, link=...)

`--link=100Mbit,50ms` puts the store behind a simulated slow link (`slowlink.SlowLink`):
a benchmark on a local store then shows the islands' utilization over a real network.

`manifest_fields(cfg)` is what a run fixes about the model and data (recorded in its
manifest); `manifest_problem` names the first field where a joiner's config differs.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import flags
from jax.sharding import Mesh
from ml_collections import config_flags

from near_jax import config as config_lib
from near_jax import sharding
from near_jax.config import ConfigError
from near_jax.data.tokenizer import load_tokenizer
from near_jax.diloco import protocol
from near_jax.diloco.protocol import ProtocolError
from near_jax.diloco.slowlink import SlowLink, parse_link
from near_jax.diloco.store import ObjectStore, StoreError
from near_jax.train.step import check_batch, resolve_config


class UsageError(ValueError):
    """What was asked for cannot run: a bad argument, config, store or run (one line)."""


COMMON_FLAGS = ("config", "store", "run", "workdir", "poll_seconds", "link")


def define_common_flags() -> None:
    """--config, --store, --run, --workdir, --poll_seconds, --link (shared by both programs;
    each declares them key flags, so that its --help lists them)."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/*.py[:arg]); override fields with --config.KEY=V."
    )
    flags.DEFINE_string(
        "store", None, "Object store: gs://BUCKET/PREFIX, s3://…, file:///… or a path."
    )
    flags.DEFINE_string("run", None, "Run name: the store prefix of this run.")
    flags.DEFINE_string("workdir", None, "Directory for metrics.jsonl and tb/ (optional).")
    flags.DEFINE_float("poll_seconds", 0.5, "Seconds between polls of the store.")
    flags.DEFINE_string(
        "link",
        "",
        "Benchmarks: reach the store over a simulated slow link RATE[,LATENCY], e.g. "
        "100Mbit,50ms (bandwidth shared by the process, latency per request); empty: off.",
    )


def check_args(
    argv: list[str],
    *,
    store: str | None,
    run: str | None,
    poll_seconds: float,
    link: str = "",
) -> str:
    """The run's name, after checking the arguments that need no config; UsageError."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for name, value in (("store", store), ("run", run)):
        if not value:
            raise UsageError(f"--{name} is required")
    try:
        run = protocol.check_name("run", run)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if poll_seconds <= 0:
        raise UsageError(f"--poll_seconds={poll_seconds} must be positive")
    link_spec(link)
    return run


def link_spec(link: str) -> tuple[float, float] | None:
    """(bandwidth_bps, latency_s) of a --link value, None if empty; UsageError."""
    if not link:
        return None
    try:
        return parse_link(link)
    except ValueError as e:
        raise UsageError(f"--link: {e}") from None


def open_run(
    cfg: ml_collections.ConfigDict,
    store_url: str,
    run: str,
    workdir: str | None,
    link: str = "",
) -> tuple[ml_collections.ConfigDict, Mesh, ObjectStore | SlowLink, dict | None]:
    """(resolved config, mesh, store, the run's manifest or None if it is new); UsageError
    for an invalid config, an unusable workdir or store, or a config the run does not take.
    A `link` spec ("100Mbit,50ms", see --link) puts the store behind a SlowLink."""
    spec = link_spec(link)
    try:
        config_lib.validate(cfg)
        cfg = resolve_config(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size)
        mesh = sharding.make_mesh(cfg.mesh)
        check_batch(cfg, mesh)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if workdir:  # now, not after the run was created in the store
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:
            raise UsageError(
                f"--workdir={workdir}: {e.strerror} (it must be a directory)"
            ) from None
    try:
        store = ObjectStore.open(store_url)
        if spec is not None:
            store = SlowLink(store, *spec)
        manifest = protocol.read_json(store, protocol.manifest_key(run))
    except (StoreError, ProtocolError) as e:
        raise UsageError(str(e)) from None
    if manifest is not None:
        problem = manifest_problem(manifest, cfg)
        if problem:
            raise UsageError(problem)
    return cfg, mesh, store, manifest


def manifest_fields(cfg) -> dict:
    """What a run fixes about the model and data (compared against each joiner's config)."""
    data = {k: cfg.data[k] for k in ("seq_len", "tokenizer")}
    return {"model": cfg.model.to_dict(), "data": data}


def manifest_problem(manifest: dict, cfg) -> str | None:
    """One line naming the first model/data field where `cfg` differs from the run, or None."""
    mine = json.loads(json.dumps(manifest_fields(cfg)))
    for section, fields in mine.items():
        theirs = manifest.get(section, {})
        for key in sorted(set(fields) | set(theirs)):
            if fields.get(key) != theirs.get(key):
                return (
                    f"config.{section}.{key}={fields.get(key)!r} is not allowed: run "
                    f"{manifest.get('run')!r} uses {theirs.get(key)!r}"
                )
    return None


def split_axes(param_shardings) -> dict[str, int]:
    """Per param leaf (by path), the axis its FSDP sharding cuts, where it has one: the axis
    the run's shard plan cuts large leaves along, so a host of a multi-host island holds
    whole slices (`protocol.shards`). A function of the config's logical axes, not of the
    mesh's size: every party computes the same."""
    out = {}
    for path, named in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        for axis, entry in enumerate(named.spec):
            names = entry if isinstance(entry, tuple) else (entry,)
            if "fsdp" in names:
                out[jax.tree_util.keystr(path)] = axis
                break
    return out
