"""Store keys of a run, names, and the protocol's constants (layout: the package docstring)."""

from __future__ import annotations

import re

from near_jax.diloco.store import ObjectStore

FORMAT = 1
LATE_WINDOW = 8  # a decision lists late pushes to the previous LATE_WINDOW rounds
MAX_CHAIN = 4  # an island this many versions behind or fewer applies updates, else pulls
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ProtocolError(RuntimeError):
    """The store holds something the protocol cannot continue from (one line)."""


def check_name(kind: str, name: str) -> str:
    """A run or island name: 1-64 of [A-Za-z0-9._-], starting alphanumeric; else ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"bad {kind} name {name!r}: 1-64 of [A-Za-z0-9._-], alphanumeric first")
    return name


def manifest_key(run: str) -> str:
    return f"{run}/run.json"


def latest_key(run: str) -> str:
    return f"{run}/latest"


def finished_key(run: str) -> str:
    return f"{run}/finished"


def version0_prefix(run: str) -> str:
    """Where version 0's shards and manifest are (later versions: their round's `out_prefix`)."""
    return f"{run}/versions/{0:08d}/"


def contrib_prefix(run: str, rnd: int) -> str:
    return f"{run}/rounds/{rnd:08d}/contrib/"


def contrib_key(run: str, rnd: int, island: str) -> str:
    return contrib_prefix(run, rnd) + island


def contrib_keys(store: ObjectStore, run: str, rnd: int) -> list[str]:
    """The contribution keys of round `rnd`: prefix + a valid island name. Anything else
    under the prefix (nested keys, odd names) is nobody's contribution and is ignored, so
    no object can pose as a second contribution of some island."""
    prefix = contrib_prefix(run, rnd)
    return [k for k in store.list(prefix) if _NAME.fullmatch(k[len(prefix) :])]


def decision_key(run: str, rnd: int) -> str:
    return f"{run}/rounds/{rnd:08d}/decision"


def contrib_shard_key(run: str, rnd: int, island: str, s: int) -> str:
    """Shard `s` of an island's contribution (outside `contrib_prefix`: listings of the
    round's contributions never see shards)."""
    return f"{run}/rounds/{rnd:08d}/shards/{island}/{s:06d}"


def out_prefix(run: str, rnd: int, proposal: str) -> str:
    """Where round `rnd` writes version rnd + 1 and its update, for one proposal (the id of
    the applied set): racing or restarted aggregators, and K workers, never overwrite the
    outputs of another set."""
    return f"{run}/rounds/{rnd:08d}/out/{proposal}/"


def outs_prefix(run: str, rnd: int) -> str:
    return f"{run}/rounds/{rnd:08d}/out/"
