"""Is a checkpoint step good? Finite state, a manifest of every file's sha256, quarantine.

Orbax commits a step atomically, but nothing checks the bytes it reads back: a flipped byte
inside array data restores without complaint (OCDBT checksums only its index). So once a
step is committed, `write` hashes every file under it into `<step>/MANIFEST_NAME`, written
atomically last: a step is *good* only when its manifest exists and `verify` finds every
listed file with the listed size and hash. A step that fails is never deleted: `quarantine`
moves it to `<checkpoints>.damaged/<step>-<time>/` with the reason beside it, so a run can
go on from an older step and the damaged one stays for inspection.

Cost: one extra read of the step when it is saved (in the background, from the page cache
on a local disk) and one when it is restored, hashed on several threads.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

MANIFEST_NAME = "near_jax_manifest.json"
# In the checkpoints directory once any step has a manifest: from then on every step needs one
# (a run saved by an older near_jax has none, and is read unverified).
MARKER_NAME = "near_jax_manifests"
DAMAGED_SUFFIX = ".damaged"
REASON_NAME = "DAMAGED.txt"
_CHUNK = 8 << 20
_FORMAT = 1


class DamagedStep(RuntimeError):
    """A step whose files do not match its manifest; the message is one line."""


class UnfinishedStep(DamagedStep):
    """A committed step whose manifest was never written (killed between commit and manifest)."""


class StepProblem(Exception):
    """Why one step cannot be used (incomplete, damaged, unreadable); the message is one line.

    `unfinished`: the save never finished (no commit marker or no manifest), as opposed to
    a finished step that was damaged afterwards.
    """

    def __init__(self, message: str, unfinished: bool = False):
        super().__init__(message)
        self.unfinished = unfinished


def _files(step_dir: epath.Path) -> list[str]:
    """Every file below `step_dir` (relative, sorted), except the manifest itself."""
    found = []
    pending = [step_dir]
    while pending:
        for path in pending.pop().iterdir():
            if path.is_dir():
                pending.append(path)
            elif path.name != MANIFEST_NAME or path.parent != step_dir:
                found.append(str(path.relative_to(step_dir)))
    return sorted(found)


def _digest(path: epath.Path) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _digests(step_dir: epath.Path, names: list[str]) -> dict[str, tuple[int, str]]:
    # hashlib releases the GIL on large buffers, so threads hash files in parallel.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        results = pool.map(lambda name: _digest(step_dir / name), names)
        return dict(zip(names, results, strict=True))


def write(step_dir: epath.Path) -> None:
    """Hashes every file of a committed step into its manifest (written atomically, last)."""
    digests = _digests(step_dir, _files(step_dir))
    manifest = {
        "format": _FORMAT,
        "files": {name: {"bytes": n, "sha256": h} for name, (n, h) in digests.items()},
    }
    mark_uses_manifests(step_dir.parent)
    tmp = step_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(step_dir / MANIFEST_NAME)


def mark_uses_manifests(directory: epath.Path) -> None:
    """Declares that every step of a checkpoints directory has (or will have) a manifest."""
    if not (directory / MARKER_NAME).exists():
        (directory / MARKER_NAME).write_text("every step here has a sha256 manifest\n")


def uses_manifests(directory: epath.Path) -> bool:
    """Whether a checkpoints directory's steps must have manifests (see MARKER_NAME)."""
    return (directory / MARKER_NAME).exists() or any(
        has_manifest(p) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()
    )


def has_manifest(step_dir: epath.Path) -> bool:
    """Whether the step was finished by `write` (not whether it still verifies)."""
    return (step_dir / MANIFEST_NAME).exists()


def _read(step_dir: epath.Path) -> dict[str, Any]:
    try:
        manifest = json.loads((step_dir / MANIFEST_NAME).read_text())
        files = manifest["files"]
        if manifest.get("format") != _FORMAT or not isinstance(files, dict):
            raise ValueError(f"unknown format {manifest.get('format')!r}")
        for entry in files.values():
            if not (isinstance(entry["bytes"], int) and isinstance(entry["sha256"], str)):
                raise ValueError("an entry lacks bytes or sha256")
        return files
    except FileNotFoundError as e:
        raise UnfinishedStep(f"no {MANIFEST_NAME} (the save never finished)") from e
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedStep(f"{MANIFEST_NAME} is unreadable ({type(e).__name__}: {e})") from e


def verify(step_dir: epath.Path) -> None:
    """Raises DamagedStep (naming the first bad file) unless every listed file is intact."""
    files = _read(step_dir)
    for name, entry in sorted(files.items()):
        path = step_dir / name
        if not path.exists():
            raise DamagedStep(f"{name} is missing")
        size = path.stat().length
        if size != entry["bytes"]:
            raise DamagedStep(f"{name} has {size} bytes, the manifest says {entry['bytes']}")
    for name, (_, digest) in sorted(_digests(step_dir, sorted(files)).items()):
        if digest != files[name]["sha256"]:
            raise DamagedStep(f"{name} does not match its sha256 (damaged bytes)")


def quarantine(step_dir: epath.Path, reason: str) -> epath.Path:
    """Moves a damaged step aside (never deletes it) with its reason; returns where it went."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    parent = step_dir.parent.parent / (step_dir.parent.name + DAMAGED_SUFFIX)
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / f"{step_dir.name}-{stamp}"
    step_dir.rename(target)
    if target.is_dir():
        (target / REASON_NAME).write_text(reason + "\n")
    else:  # a stray file where a step directory belongs
        (parent / f"{target.name}.{REASON_NAME}").write_text(reason + "\n")
    return target


def is_finite(tree: Any) -> bool:
    """Whether every floating-point value in `tree` is finite (one fused reduction on device)."""
    leaves = [
        x
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return not leaves or bool(_all_finite(leaves))


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def config_problem(saved: Any) -> str | None:
    """What makes a saved config not one of a run (not an object, a section missing), or None."""
    if not isinstance(saved, dict):
        return f"the saved config is a JSON {type(saved).__name__}, not an object"
    for section in ("model", "data"):
        if not isinstance(saved.get(section), dict):
            return f"the saved config has no {section} section"
    return None


def checked_config(saved: Any) -> dict:
    """A saved config as a dict, or ValueError (one line, `config_problem`) if it is not one."""
    problem = config_problem(saved)
    if problem:
        raise ValueError(problem)
    return dict(saved)


def verify_everywhere(step_dir: epath.Path) -> None:
    """Checks a step against its manifest on process 0 and shares the verdict (StepProblem)."""
    problem, verdict = "", _OK
    if jax.process_index() == 0:
        try:
            verify(step_dir)
        except UnfinishedStep as e:
            problem, verdict = str(e), _UNFINISHED
        except DamagedStep as e:
            problem, verdict = str(e), _DAMAGED
        except OSError as e:
            problem, verdict = f"cannot be checked ({type(e).__name__}: {e})", _DAMAGED
    if jax.process_count() > 1:  # every process must take the same step
        verdict = int(multihost_utils.broadcast_one_to_all(np.int32(verdict)))
        problem = problem or ("" if verdict == _OK else "failed its check on process 0")
    if verdict != _OK:
        raise StepProblem(f"damaged ({problem})", unfinished=verdict == _UNFINISHED)


_OK, _DAMAGED, _UNFINISHED = 0, 1, 2


def barrier(name: str) -> None:
    """Waits for every process (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
