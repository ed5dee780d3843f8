"""DiLoCo across islands as real processes on localhost: the island and aggregator programs."""

import json
import os
import re
import signal
import time

from helpers import (
    MODEL,
    RUN,
    Procs,
    fast_xla,
    latest_version,
    metric_records,
    model_like,
    start_module,
)

from near_jax.diloco import protocol
from near_jax.diloco.store import ObjectStore

ROUNDS, QUORUM, TIMEOUT = 8, 2, 5


def test_islands_and_aggregator_survive_kills(tmp_path):
    """3 islands + an aggregator split over 2 processes (--shards=0/2, 1/2): b is SIGKILLed
    mid-round, c joins late, the worker and then the coordinator are SIGKILLed mid-round
    and restarted; the run finishes, consistent and learning."""
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    store = ObjectStore.open(str(store_dir))
    common = [f"--store=file://{store_dir}", f"--run={RUN}", "--poll_seconds=0.1", *MODEL]
    agg_args = [
        *common,
        f"--rounds={ROUNDS}",
        f"--quorum={QUORUM}",
        f"--round_timeout={TIMEOUT}",
        f"--workdir={tmp_path / 'agg'}",
        "--shards=0/2",
    ]
    worker_args = [*common, "--shards=1/2", "--round_timeout=300"]

    def island(name, *extra):
        return procs.start(
            name, "island", *common, f"--island={name}", f"--workdir={tmp_path / name}", *extra
        )

    procs = Procs(tmp_path)
    t0 = time.monotonic()
    phases = {}
    try:
        for name in "ab":  # compile first, then wait for the run
            island(name, "--wait_for_run=300")
        procs.wait_for(
            "islands a, b compiled", lambda: all("waiting up to" in procs.log(n) for n in "ab"), 150
        )
        phases["compiled"] = round(time.monotonic() - t0, 1)
        procs.start("agg1", "aggregator", *agg_args)
        procs.start("w1", "aggregator", *worker_args)
        procs.wait_for("version 2", lambda: latest_version(store) >= 2, 90)
        procs.procs["w1"].send_signal(signal.SIGKILL)  # its slice of a round: redone by w2
        procs.start("w2", "aggregator", *worker_args)
        procs.procs["b"].send_signal(signal.SIGKILL)  # mid-round: training or waiting
        b_killed_at = latest_version(store)
        phases["v2"] = round(time.monotonic() - t0, 1)
        island("c")  # joins late: the run exists
        procs.wait_for("version 5", lambda: latest_version(store) >= 5, 90)
        procs.procs["agg1"].send_signal(signal.SIGKILL)  # mid-round (collecting or publishing)
        procs.procs["agg1"].wait()
        agg_killed_at = latest_version(store)
        phases["v5"] = round(time.monotonic() - t0, 1)
        restarted = procs.start("agg2", "aggregator", *agg_args)
        restarted.wait(timeout=120)
        phases["agg2 done"] = round(time.monotonic() - t0, 1)
        for name in ("a", "c", "w2"):
            procs.procs[name].wait(timeout=60)
    finally:
        procs.kill_all()
    elapsed = time.monotonic() - t0
    assert restarted.returncode == 0, procs.logs()
    assert procs.procs["a"].returncode == 0 and procs.procs["c"].returncode == 0, procs.logs()
    assert procs.procs["b"].returncode == -signal.SIGKILL
    assert procs.procs["w2"].returncode == 0 and "worker 1/2" in procs.log("w2"), procs.logs()
    derived = re.search(r"derived (\d+) proposals", procs.log("w2"))
    assert derived and int(derived.group(1)) >= 1, procs.log("w2")  # it shared the rounds

    # The run is complete and every version is exactly version 0 + its decisions, each
    # applied once (replayed from the store; every object read is validated).
    like = model_like()
    assert latest_version(store) == ROUNDS and store.exists(protocol.finished_key(RUN))
    assert protocol.verify_run(store, RUN, like) == []
    decisions = [json.loads(store.get(protocol.decision_key(RUN, r))) for r in range(ROUNDS)]
    applied = [{e["island"] for e in d["accepted"]} for d in decisions]
    assert all(not d["rejected"] for d in decisions)  # no partial or corrupt object was read
    assert any("b" in a for a in applied[:b_killed_at])
    assert not any("b" in a for a in applied[b_killed_at + 1 :])
    after_b = next(r for r in range(b_killed_at, ROUNDS) if "b" not in applied[r])
    assert decisions[after_b]["reason"] in ("deadline", "quorum") and applied[after_b] <= {"a", "c"}
    first_c = min(r for r, a in enumerate(applied) if "c" in a)
    assert first_c >= b_killed_at
    assert f"resumed at version {agg_killed_at} " in procs.log("agg2")  # that round: once
    # The aggregator logged each round at most once over both lives; eval loss fell.
    records = metric_records(tmp_path / "agg" / "metrics.jsonl", "aggregator")
    logged = [x["round"] for x in records if "round" in x]
    assert len(logged) == len(set(logged)) and set(logged) <= set(range(ROUNDS))
    v0_loss = next(x["eval_loss"] for x in records if x.get("version") == 0 and "round" not in x)
    last = max((x for x in records if "round" in x), key=lambda x: x["round"])
    assert last["version"] == ROUNDS and last["eval_loss"] < v0_loss - 0.5, records
    # Islands log what they moved: a full pull when joining, then updates only.
    a = metric_records(tmp_path / "a" / "metrics.jsonl", "island")
    assert a[0]["full_pull"] == 1 and all(x["full_pull"] == 0 for x in a[1:])
    assert all(x["bytes_pulled"] > 0 and x["inner_loss"] > 0 for x in a)
    # An island does not push into a round that closed first (e.g. the restarted aggregator
    # closing an overdue round at once): that round is late for it, and sends nothing.
    assert sum(x["accepted"] for x in a) >= ROUNDS - 2
    assert all(x["bytes_pushed"] > 0 or x["late"] for x in a), a
    c = metric_records(tmp_path / "c" / "metrics.jsonl", "island")
    assert c and c[0]["round"] >= b_killed_at and c[0]["full_pull"] == 1
    print(
        f"multi-process run: {elapsed:.1f}s; b killed at {b_killed_at}, aggregator at "
        f"{agg_killed_at}, c first applied in round {first_c}; phases {phases}"
    )


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "store"
    empty.mkdir()
    store, run = f"--store={empty}", f"--run={RUN}"
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {
        "workdir file": (
            "aggregator",
            [store, run, "--rounds=2", f"--workdir={afile}"],
            "--workdir",
        ),
        "island workdir file": (
            "island",
            [store, run, "--island=a", f"--workdir={afile}"],
            "--workdir",
        ),
        "missing store": (
            "aggregator",
            [f"--store={tmp_path / 'nope'}", run, "--rounds=2"],
            "does not exist",
        ),
        "unknown run": ("island", [store, run, "--island=a"], "unknown run"),
        "bad quorum": ("aggregator", [store, run, "--rounds=2", "--quorum=0"], "--quorum"),
        "unknown flag": ("island", [store, run, "--island=a", "--bogus=1"], "bogus"),
        "bad island": ("island", [store, run, "--island=../x"], "bad island name"),
        "bad shards": ("aggregator", [store, run, "--rounds=2", "--shards=2/2"], "is not i/K"),
    }
    procs = Procs(tmp_path)
    try:
        for name, (module, args, _) in cases.items():
            procs.start(name.replace(" ", "_"), module, *MODEL, *args)
        for name, (_, _, message) in cases.items():
            proc = procs.procs[name.replace(" ", "_")]
            proc.wait(timeout=120)
            err = procs.log(name.replace(" ", "_")).strip()
            assert proc.returncode == 2 and message in err and len(err.splitlines()) == 1, err
        assert os.listdir(empty) == []  # nothing was created in the store
    finally:
        procs.kill_all()


# A multi-host island: x as 2 processes (launch.local, gloo) vs x as 1 process, same mesh.
HOSTS_MODEL = [
    *MODEL,
    "--config.diloco.shard_bytes=2048",  # small shards: leaves are cut along their FSDP axis
    "--config.data.shards=2",  # the same global batches for 1 or 2 processes
    "--config.train.eval_batches=1",
]
X_MESH = ["--config.mesh.fsdp=2", "--config.mesh.data=1"]


def _run_with_island_x(tmp_path, hosts):
    """3 rounds of island x (`hosts` processes, 2 devices in all) and island y (1 process)
    with an aggregator; returns (store, x's per-host metrics, x's log)."""
    store_dir = tmp_path / "store"
    store_dir.mkdir(parents=True)
    common = [f"--store=file://{store_dir}", f"--run={RUN}", "--poll_seconds=0.1", *HOSTS_MODEL]
    island = ["--wait_for_run=240"]
    procs = Procs(tmp_path)
    try:
        agg = ["--rounds=3", "--quorum=2", "--round_timeout=300", "--eval_batches=0"]
        procs.start("agg", "aggregator", *common, *agg)
        procs.start("y", "island", *common, "--island=y", *island, f"--workdir={tmp_path / 'y'}")
        x_args = [*common, *X_MESH, "--island=x", *island, f"--workdir={tmp_path / 'x'}"]
        with open(tmp_path / "x.log", "w") as log:
            if hosts == 1:
                command = ["near_jax.diloco.island", *x_args]
                xla = f"--xla_force_host_platform_device_count=2 {fast_xla()}"
                env = {**procs.env, "XLA_FLAGS": xla}
            else:
                launch = ["-n", "2", "--devices_per_process=1", "--timeout_s=300", "--"]
                command = ["launch.local", *launch, "python", "-m", "near_jax.diloco.island"]
                command += x_args
                env = procs.env
            procs.procs["x"] = start_module(*command, env=env, stdout=log, stderr=log)
        for name in ("agg", "x", "y"):
            procs.procs[name].wait(timeout=300)
    finally:
        procs.kill_all()
    assert all(p.returncode == 0 for p in procs.procs.values()), procs.logs()
    store = ObjectStore.open(str(store_dir))
    per_host = [metric_records(tmp_path / "x" / "metrics.jsonl", "island")]
    if hosts == 2:
        per_host.append(metric_records(tmp_path / "x" / "host1" / "metrics.jsonl", "island"))
    return store, per_host, procs.log("x")


def test_a_two_host_island_pushes_its_own_shards_and_gives_the_same_bits(tmp_path):
    two_store, two, log = _run_with_island_x(tmp_path / "two", hosts=2)
    one_store, (one,), _ = _run_with_island_x(tmp_path / "one", hosts=1)
    # Both islands were applied in every round, in both runs.
    for store in (two_store, one_store):
        decisions = [protocol.read_json(store, protocol.decision_key(RUN, r)) for r in range(3)]
        assert [sorted(e["island"] for e in d["accepted"]) for d in decisions] == [["x", "y"]] * 3
    # The global params are the same bits whether x ran as one process or two.
    assert (
        protocol.read_latest(two_store, RUN)["params_sha256"]
        == (protocol.read_latest(one_store, RUN)["params_sha256"])
    )
    assert protocol.verify_run(two_store, RUN, model_like(*HOSTS_MODEL)) == []
    # Each host wrote only its own shards: together exactly what one process writes, and
    # each pulled only its part of the params.
    assert "[0] island x: joined" in log and "host 1/2" in log
    for r in range(3):
        pushed = [host[r]["bytes_pushed"] for host in two]
        assert min(pushed) > 0 and sum(pushed) == one[r]["bytes_pushed"], (r, pushed, one[r])
    assert all(host[0]["bytes_pulled"] < one[0]["bytes_pulled"] for host in two)


def _overlap_run(procs, tmp_path, name, islands, *extra, config=(), rounds=4):
    """Starts an aggregator (`rounds`, quorum = len(islands)) and `islands` with `extra`
    flags in their own store under tmp_path/name (`config` flags for all); returns the
    store."""
    store_dir = tmp_path / name / "store"
    store_dir.mkdir(parents=True)
    common = [f"--store=file://{store_dir}", f"--run={RUN}", "--poll_seconds=0.05", *MODEL]
    common += config
    agg = [f"--rounds={rounds}", f"--quorum={len(islands)}", "--round_timeout=300"]
    agg.append("--eval_batches=0")
    procs.start(f"{name}-agg", "aggregator", *common, *agg)
    for island in islands:
        where = f"--workdir={tmp_path / name / island}"
        procs.start(f"{name}-{island}", "island", *common, f"--island={island}", where, *extra)
    return ObjectStore.open(str(store_dir))


def test_overlap_zero_is_synchronous_bit_for_bit_and_overlapped_runs_replay(tmp_path):
    """All three runs: 2 fragments, SparseLoCo (2-bit chunked top-k, decayed error feedback,
    no outer momentum). --overlap=0 (the exchange in a background thread, then the restart
    formula) gives the synchronous run's contributions and params bit for bit; an
    overlapped run of two islands finishes, syncs each fragment in turn, learns and
    replays cleanly."""
    wait = "--wait_for_run=240"
    sparse = [
        "--config.diloco.outer_optimizer=sparseloco",
        "--config.diloco.compression=int2:block=32:chunk=64+topk=0.1",
        "--config.diloco.fragments=2",  # rounds of 1 and 2 inner steps (H = 3)
        "--config.model.n_layers=2",
        "--config.diloco.shard_bytes=4096",
    ]
    procs = Procs(tmp_path)
    try:
        stores = {
            # One model and run config for all three: one compilation, shared via the cache.
            "sync": _overlap_run(procs, tmp_path, "sync", ["a"], wait, config=sparse),
            "zero": _overlap_run(
                procs, tmp_path, "zero", ["a"], wait, "--overlap=0", config=sparse
            ),
            "full": _overlap_run(procs, tmp_path, "full", "ab", wait, "--overlap=1", config=sparse),
        }
        for proc in procs.procs.values():
            proc.wait(timeout=300)
    finally:
        procs.kill_all()
    assert all(p.returncode == 0 for p in procs.procs.values()), procs.logs()
    sync, zero, full = stores["sync"], stores["zero"], stores["full"]
    for r in range(4):
        key = protocol.contrib_key(RUN, r, "a")
        assert sync.get(key) == zero.get(key), f"round {r}: the contributions differ"
    assert (
        protocol.read_latest(sync, RUN)["params_sha256"]
        == (protocol.read_latest(zero, RUN)["params_sha256"])
    )
    manifest = protocol.read_json(full, protocol.manifest_key(RUN))
    assert (manifest["outer_optimizer"], manifest["outer_momentum"]) == ("sparseloco", 0.0)
    assert manifest["feedback_decay"] == 0.95 and manifest["outer_lr"] == 1.0
    assert manifest["fragments"] == 2
    like = model_like(*MODEL, *sparse)
    assert protocol.verify_run(full, RUN, like) == []
    decisions = [protocol.read_json(full, protocol.decision_key(RUN, r)) for r in range(4)]
    assert [sorted(e["island"] for e in d["accepted"]) for d in decisions] == [["a", "b"]] * 4
    plan = protocol.run_plan(manifest, like)
    for r in range(4):  # each round's update touched exactly its fragment
        v = protocol.load_version(full, RUN, r + 1, plan)
        touched = tuple(s for s, h in enumerate(v.manifest.update) if h is not None)
        assert touched == plan.fragment(2, r), (r, touched)
    for name in ("sync", "full"):
        records = metric_records(tmp_path / name / "a" / "metrics.jsonl", "island")
        assert len(records) == 4
        for x in records:  # utilization = train / wall; idle = waiting with nothing to train
            assert 0 < x["utilization"] <= 1 and x["idle_s"] >= 0, x
            assert abs(x["utilization"] - x["train_s"] / x["wall_s"]) < 1e-9, x
    # Overlapped: the later rounds' losses fall as the synchronous ones do.
    losses = [
        x["inner_loss"] for x in metric_records(tmp_path / "full" / "a" / "metrics.jsonl", "island")
    ]
    assert losses[-1] < losses[0], losses
