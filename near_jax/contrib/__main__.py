"""Contributor tools: python -m near_jax.contrib COMMAND [flags]

    keygen      --out=PATH [--force]               a new ed25519 key (PATH, 0600) and PATH.pub
    register    --key=PATH --name=NAME --store=URL --run=RUN
                                                   registers the key as contributor NAME
    verify      --store=URL --run=RUN [--ledger=PATH]
                                                   audits the run: decisions (signed by the
                                                   aggregator key, whose id it prints), ledger
                                                   chain, signatures, seeds, rewards, registry
                                                   (exit 1: problems; warnings do not fail it)
    leaderboard --store=URL --run=RUN [--window=W] [--csv=PATH|-] [--ledger=PATH]
                                                   standings over the last W closed rounds
                                                   (0: all)
    promote     --store=URL --run=RUN --top=K [--window=W] [--min_rounds=N]
                [--out=PATH --key=AGG_KEY] [--ledger=PATH]
                                                   who qualifies for the next rung; --out
                                                   writes them as a promotion document signed
                                                   by the run's aggregator key (--key), which
                                                   the next rung's aggregator takes as
                                                   --allowlist
    admit       --store=URL --run=RUN --key=AGG_KEY (--name=NAME --public_key=HEX |
                --promotion=PATH) [--force]        admits a key (or a promotion's keys) to an
                                                   allowlisted run, signed by its aggregator
    codehash                                       this code's hash (config.contrib.allowed_code)

leaderboard and promote first run verify's whole audit (of --ledger=PATH, when given, against
the signed decisions) and refuse a run that fails it: a forged ledger copy with a valid hash
chain would otherwise rank anyone first. Their window counts back from the latest closed
round (the latest version − 1), so rounds a contributor sat out still count against it.

Exit status: 0 done, 1 the store, ledger or audit failed (one line on stderr, or the
problems found), 2 a command-line mistake (one line on stderr). Nothing in the store, however
damaged or absurd, gives a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from absl import flags

from near_jax import cli
from near_jax._io import atomic_write, one_line
from near_jax.cli import quiet_library_logs, usage_error
from near_jax.contrib import allowlist, attest, audit, identity, registry, rewards
from near_jax.contrib.identity import IdentityError
from near_jax.contrib.ledger import LedgerError
from near_jax.diloco import protocol
from near_jax.diloco.protocol import ProtocolError
from near_jax.diloco.store import CorruptObject, ObjectStore, StoreError

_PROG = "near_jax.contrib"
_STORE = ("store", "run")


@dataclasses.dataclass(frozen=True)
class Command:
    """A command: what it runs, the flags it needs and the flags it also takes."""

    run: Callable[[Any], int]
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


def define_flags() -> None:
    """The flags of every command (each command accepts only its own)."""
    flags.DEFINE_string("out", None, "keygen: the key file to write; promote: a JSON file.")
    flags.DEFINE_bool(
        "force", False, "keygen: replace an existing key file; admit: replace forged additions."
    )
    flags.DEFINE_string(
        "key", None, "register: the contributor's key file; promote, admit: the aggregator's."
    )
    flags.DEFINE_string("name", None, "register: the contributor name to claim; admit: to admit.")
    flags.DEFINE_string("public_key", None, "admit: the public key (64 hex) to admit as --name.")
    flags.DEFINE_string("promotion", None, "admit: a promotion document whose keys to admit.")
    flags.DEFINE_string(
        "store", None, "Object store: gs://BUCKET/PREFIX, s3://…, file:///… or a path."
    )
    flags.DEFINE_string("run", None, "Run name: the store prefix of the run.")
    flags.DEFINE_string("ledger", None, "A local ledger file to read instead of the store's copy.")
    flags.DEFINE_integer("window", 0, "Standings over the last W rounds (0: every round).")
    flags.DEFINE_string("csv", None, "leaderboard: also write the standings as CSV ('-': stdout).")
    flags.DEFINE_integer("top", None, "promote: how many contributors to promote (>= 1).")
    flags.DEFINE_integer(
        "min_rounds", 1, "promote: accepted in at least this many rounds of the window."
    )


# ---------------------------------------------------------------------------- commands


def keygen(f: Any) -> int:
    """Generates and saves a key; prints its id, public key and where it went."""
    if os.path.lexists(f.out) and not f.force:
        usage_error(f"--out={f.out} exists; refusing to overwrite a key (pass --force)")
    ident = identity.generate()
    try:
        identity.save(ident, f.out, overwrite=f.force)
    except identity.IdentityError as e:
        usage_error(str(e))
    print(f"key id {ident.key_id}")
    print(f"public key {ident.public_hex}")
    print(f"wrote {f.out} (private: keep it secret) and {f.out}.pub (public: hand it out)")
    return 0


def register(f: Any) -> int:
    """Registers the key in --key as contributor --name of the run."""
    try:
        ident = identity.load(f.key)
    except identity.IdentityError as e:
        usage_error(str(e))
    store, run = _open_run(f)
    try:
        created = registry.register(store, run, f.name, ident, time.time())
    except identity.IdentityError as e:
        usage_error(str(e))
    if created:
        print(f"registered {f.name} (key id {ident.key_id}) in run {run}")
    else:
        print(f"already registered: {f.name} (key id {ident.key_id}) in run {run}")
    return 0


def verify(f: Any) -> int:
    """Audits the run; exit status 1 when anything does not check out."""
    store, run = _open_run(f)
    problems, s = audit.verify(store, run, ledger_path=f.ledger)
    print(
        f"run {run} (aggregator key id {s['aggregator_key_id'] or '?'}): {s['rounds']} closed "
        f"rounds, {s['entries']} ledger entries from {s['contributors']} contributors "
        f"({s['accepted']} accepted, {s['rejected']} rejected), head {s['head'][:16] or '-'}"
    )
    for w in s["warnings"]:
        print(f"warning: {w}")
    for p in problems:
        print(p)
    n = len(problems)
    print(f"{n} problem{'s' * (n != 1)}" if problems else "OK: everything checks out")
    return 1 if problems else 0


def leaderboard(f: Any) -> int:
    """Prints the standings over the window; optionally writes them as CSV."""
    found = _ranked(f)
    if found is None:
        return 1
    run, checked, first, last, ranked = found
    header = _rounds_header(run, checked, first, last)
    if f.csv == "-":  # stdout is the CSV alone, so it can be piped
        print(header, file=sys.stderr)
        sys.stdout.write(rewards.to_csv(ranked))
        return 0
    print(header)
    if ranked:
        print(rewards.table(ranked))
    if f.csv:
        if not _write(f.csv, rewards.to_csv(ranked)):
            return 1
        print(f"wrote {f.csv}")
    return 0


def promote(f: Any) -> int:
    """Prints who qualifies for promotion; with --out, writes them (and their keys) as a
    promotion document signed by the run's aggregator key."""
    if f.top is None or f.top < 1:
        usage_error(f"--top={f.top} is not allowed: must be >= 1")
    if f.min_rounds < 1:
        usage_error(f"--min_rounds={f.min_rounds} is not allowed: must be >= 1")
    if f.out and not f.key:
        usage_error(f"--out={f.out} needs --key=AGG_KEY: the run's aggregator key signs it")
    if f.key and not f.out:
        usage_error("--key applies to promote only with --out (it signs the document)")
    if f.out:
        _check_window(f)
        key, _ = _aggregator(f, *_open_run(f))
    found = _ranked(f)
    if found is None:
        return 1
    run, checked, first, last, ranked = found
    chosen = rewards.promotable(ranked, f.top, f.min_rounds)
    print(
        f"{_rounds_header(run, checked, first, last)}: top {f.top}, accepted in >= "
        f"{f.min_rounds} rounds, never caught cheating"
    )
    registered = checked.registry  # the valid entries, as audited
    out = []
    width = max((len(s.contributor) for s in chosen), default=0)
    for rank, s in enumerate(chosen, 1):
        public = registered.get(s.contributor, "")
        # a name freed and re-registered to another key must not promote that other key
        if public and identity.key_id(public) != s.key_id:
            _warn(
                f"{s.contributor} is now registered to key id {identity.key_id(public)}, "
                f"not {s.key_id}; public_key left empty"
            )
            public = ""
        print(
            f"{rank:>3}  {s.contributor:<{width}}  key id {s.key_id or '-'}  "
            f"reward {s.reward:.4f}  rounds {len(s.rounds)}"
        )
        out.append(
            {
                "contributor": s.contributor,
                "key_id": s.key_id,
                "public_key": public,
                "reward": s.reward,
                "rounds": len(s.rounds),
            }
        )
    if not chosen:
        print("nobody qualifies")
    if f.out:
        for row in out:
            if not row["public_key"]:
                _warn(f"{row['contributor']}'s public key is unknown; left out of {f.out}")
        rows = [row for row in out if row["public_key"]]
        doc = allowlist.sign_promotion(
            key, run, rows, window=f.window, top=f.top, issued_at=time.time()
        )
        if not _write(f.out, json.dumps(doc, indent=2) + "\n"):
            return 1
        print(f"wrote {f.out}: {len(rows)} contributors, signed by key id {key.key_id}")
    return 0


def admit(f: Any) -> int:
    """Admits --name with --public_key (or a promotion's keys) to an allowlisted run."""
    if bool(f.promotion) == bool(f.name or f.public_key):
        usage_error("admit takes either --name=NAME --public_key=HEX or --promotion=PATH")
    store, run = _open_run(f)
    key, manifest = _aggregator(f, store, run)
    if f.promotion:
        try:
            promotion = allowlist.read_promotion(f.promotion)
        except ValueError as e:
            usage_error(str(e))
        problem = allowlist.source_problem(store, promotion)
        if problem:
            usage_error(f"--promotion={f.promotion}: {problem}")
        keys = promotion.keys
    else:
        if not (f.name and f.public_key):
            usage_error("admit --name=NAME needs --public_key=HEX (and the other way round)")
        try:
            keys = {
                protocol.check_name("contributor", f.name): identity.check_public_hex(f.public_key)
            }
        except (ValueError, IdentityError) as e:
            usage_error(str(e))
    try:
        additions, new = allowlist.admit(store, run, key, manifest, keys, force=f.force)
    except ValueError as e:
        usage_error(str(e))
    for name in new:
        print(f"admitted {name} (key id {identity.key_id(keys[name])}) to run {run}")
    already = len(keys) - len(new)
    if already:
        print(f"already admitted: {already} of {len(keys)}")
    print(f"{allowlist.additions_key(run)} is at seq {additions.seq}")
    return 0


def codehash(f: Any) -> int:
    """Prints the sha256 of this near_jax package's source."""
    print(attest.code_sha256())
    return 0


COMMANDS = {
    "keygen": Command(keygen, ("out",), ("force",)),
    "register": Command(register, ("key", "name", *_STORE)),
    "verify": Command(verify, _STORE, ("ledger",)),
    "leaderboard": Command(leaderboard, _STORE, ("window", "csv", "ledger")),
    "promote": Command(promote, (*_STORE, "top"), ("window", "min_rounds", "out", "key", "ledger")),
    "admit": Command(admit, ("key", *_STORE), ("name", "public_key", "promotion", "force")),
    "codehash": Command(codehash, ()),
}
_OWN_FLAGS = (
    "out",
    "force",
    "key",
    "name",
    "public_key",
    "promotion",
    "store",
    "run",
    "ledger",
    "window",
    "csv",
    "top",
    "min_rounds",
)


# ----------------------------------------------------------------------------- helpers


def _open_run(f: Any) -> tuple[Any, str]:
    """(store, run) of a contributor run; a usage error for a bad URL, name or run."""
    try:
        run = protocol.check_name("run", f.run)
    except ValueError as e:
        usage_error(str(e))
    try:
        store = ObjectStore.open(f.store)
    except StoreError as e:
        usage_error(str(e))
    try:
        manifest = protocol.read_json(store, protocol.manifest_key(run))
    except (CorruptObject, ProtocolError) as e:  # exit 1 in _main, one line
        why = one_line(e)
        raise ProtocolError(f"the run manifest is unreadable: {why}") from None
    if manifest is None:
        usage_error(f"unknown run {run!r}: no {protocol.manifest_key(run)} in {f.store}")
    if not isinstance(manifest.get("contrib"), dict):
        usage_error(f"run {run!r} is not a contributor run (its manifest has no contrib section)")
    if getattr(f, "ledger", None) and not os.path.isfile(f.ledger):
        usage_error(f"--ledger={f.ledger}: no such file (leave it out to read the store's copy)")
    return store, run


def _aggregator(f: Any, store: Any, run: str) -> tuple[identity.Identity, dict]:
    """(the key in --key, the run's manifest) if it is the run's aggregator key (else a
    usage error)."""
    try:
        key = identity.load(f.key)
    except identity.IdentityError as e:
        usage_error(f"--key={f.key}: {e}")
    manifest = protocol.read_json(store, protocol.manifest_key(run))
    theirs = manifest["contrib"].get("aggregator_key")
    if key.public_hex != theirs:
        try:
            theirs_id = identity.key_id(identity.check_public_hex(theirs))
        except IdentityError:
            theirs_id = "? (malformed)"
        usage_error(
            f"--key={f.key} is key id {key.key_id}, not run {run}'s aggregator key (key id "
            f"{theirs_id})"
        )
    return key, manifest


def _audited(f: Any, store: Any, run: str) -> Any:
    """The run's audit (`audit.Audit`, of --ledger when given), or None after one line on
    stderr when it finds problems: standings from a ledger that does not check out are
    worthless. Its warnings go to stderr."""
    checked = audit.audit(store, run, ledger_path=f.ledger)
    if checked.problems or checked.entries is None:
        problems = checked.problems or ["no readable ledger"]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        _error(
            f"refusing to rank run {run}: its audit fails: {problems[0]}{more} (details: "
            f"python -m {_PROG} verify)"
        )
        return None
    for w in checked.warnings:
        _warn(w)
    return checked


def _ranked(f: Any) -> tuple[str, Any, int, int, list] | None:
    """(run, audit, first, last, standings over the window) of an audited run; None after
    one line on stderr when the audit fails."""
    _check_window(f)
    store, run = _open_run(f)
    checked = _audited(f, store, run)
    if checked is None:
        return None
    first, last = rewards.window_bounds(checked.latest, f.window)
    return run, checked, first, last, rewards.standings(checked.entries, first, last)


def _rounds_header(run: str, checked: Any, first: int, last: int) -> str:
    if last < 0:
        return f"run {run}: no round closed yet"
    if not checked.entries:
        return f"run {run}, rounds {first}–{last}: no contributions recorded yet"
    return f"run {run}, rounds {first}–{last}"


def _check_window(f: Any) -> None:
    if f.window < 0:
        usage_error(f"--window={f.window} is not allowed: must be >= 0 (0: every round)")
    if f.window and f.min_rounds > f.window:
        usage_error(f"--min_rounds={f.min_rounds} can never be met in --window={f.window} rounds")
    if f.csv and f.csv != "-":
        directory = os.path.dirname(os.path.abspath(f.csv))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            usage_error(f"--csv={f.csv}: {directory} is not a writable directory")


def _write(path: str, text: str) -> bool:
    """Writes `path` atomically; False (after one line on stderr) if it cannot."""
    try:
        atomic_write(path, text)
    except OSError as e:
        _error(f"cannot write {path}: {e.strerror or e}")
        return False
    return True


def _error(message: str) -> None:
    print(f"{_PROG}: error: {' '.join(message.split())}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"{_PROG}: warning: {' '.join(message.split())}", file=sys.stderr)


def _main(argv: list[str]) -> None:
    quiet_library_logs()
    names = ", ".join(COMMANDS)
    if len(argv) < 2:
        usage_error(f"a command is required: {names}")
    command = argv[1]
    if command not in COMMANDS:
        usage_error(f"unknown command {command!r}: the commands are {names}")
    if len(argv) > 2:
        usage_error(f"unexpected arguments: {' '.join(argv[2:])}")
    spec, f = COMMANDS[command], flags.FLAGS
    takes = (*spec.required, *spec.optional)
    for name in _OWN_FLAGS:
        if f[name].present and name not in takes:
            allowed = " ".join(f"--{n}" for n in takes) or "no flags"
            usage_error(f"--{name} does not apply to {command} (it takes {allowed})")
    for name in spec.required:
        if f[name].value is None or f[name].value == "":
            usage_error(f"--{name} is required for {command}")

    try:
        code = spec.run(f)
    except (StoreError, LedgerError, ProtocolError, IdentityError) as e:
        _error(str(e)[:500])  # CorruptObject is a StoreError
        code = 1
    except RecursionError:  # every reader turns absurd nesting into one of the above: a net
        _error("a store object is nested too deeply to read")
        code = 1
    sys.exit(code)


def main() -> None:
    """Console entry point."""
    if sys.argv and os.path.basename(sys.argv[0]) == "__main__.py":
        sys.argv[0] = _PROG  # `python -m` names the file; messages should name the program
    cli.run(_main, define_flags)


if __name__ == "__main__":
    main()
