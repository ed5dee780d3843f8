"""Tests of near_jax.diloco.slowlink: a store behind a simulated slow link (fake clocks), the
--link spec, and the programs' exit 2 on a bad one."""

import threading

import pytest
from helpers import MODEL, RUN, FakeClock, Procs, small_config

from near_jax.diloco import startup
from near_jax.diloco.slowlink import Link, SlowLink, parse_link
from near_jax.diloco.startup import UsageError
from near_jax.diloco.store import HEADER, CorruptObject, ObjectStore, frame

MB = 1_000_000
BODY = b"x" * (MB - HEADER.size)  # stored (framed) size: exactly 1 MB


class FrozenClock:
    """A clock that does not move; sleep records how long each caller would wait (so calls
    made one after the other are "started at the same time")."""

    def __init__(self):
        self.slept, self._lock = [], threading.Lock()

    def __call__(self):
        return 0.0

    def sleep(self, seconds):
        with self._lock:
            self.slept.append(seconds)


@pytest.fixture
def inner(tmp_path):
    store = ObjectStore.open(str(tmp_path))
    store.put("big", BODY)
    store.put("small", b"s")
    return store


def slow(inner, clock, bandwidth=8e6, latency=0.05):
    return SlowLink(inner, bandwidth, latency, clock=clock, sleep=clock.sleep)


def test_a_1mb_read_on_8mbit_with_50ms_latency_takes_1_05_s(inner):
    clock = FakeClock()
    store = slow(inner, clock)
    start = clock()
    assert store.get("big") == BODY
    assert clock() - start == pytest.approx(1.05)
    start = clock()
    assert store.put("big2", BODY) == MB  # writes alike
    assert clock() - start == pytest.approx(1.05)
    assert inner.get("big2") == BODY
    assert store.link.waited_s == pytest.approx(2.1)


def test_concurrent_transfers_queue_on_the_shared_link(inner):
    clock = FrozenClock()
    store = slow(inner, clock)
    threads = [threading.Thread(target=store.get, args=("big",)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(clock.slept) == pytest.approx([1.05, 2.05])  # the second waits its turn
    # another SlowLink on the same Link shares the bandwidth; latency alone does not queue
    other = SlowLink(inner, link=store.link)
    clock.slept.clear()
    assert other.exists("big") and other.put("b3", BODY) == MB
    assert clock.slept == pytest.approx([0.05, 3.05])


def test_every_request_pays_the_latency(inner):
    clock = FakeClock()
    store = slow(inner, clock, bandwidth=1e9, latency=0.05)
    calls = [
        lambda: store.exists("small"),
        lambda: store.exists("nope"),
        lambda: store.list(""),
        lambda: store.get("small"),
        lambda: store.get_with_generation("small"),
        lambda: store.read_prefix("small", 10),
        lambda: store.put("k", b""),
        lambda: store.put_if_absent("k", b"y"),
        lambda: store.put_if_generation("k", b"y", b"wrong"),
        lambda: store.delete("k"),
    ]
    for call in calls:
        start = clock()
        call()
        assert clock() - start == pytest.approx(0.05, abs=1e-4)  # (+ 1e-9 s per byte)


def test_bandwidth_0_is_latency_only(inner):
    clock = FakeClock()
    store = slow(inner, clock, bandwidth=0, latency=0.01)
    start = clock()
    store.get("big")
    store.put("big2", BODY)
    assert clock() - start == pytest.approx(0.02)
    assert SlowLink(inner).get("big") == BODY  # no link at all: no waiting


def test_results_counters_and_errors_pass_through(inner, tmp_path):
    clock = FakeClock()
    store = slow(inner, clock)
    assert store.url == inner.url == str(tmp_path)
    read, written = inner.bytes_read, inner.bytes_written
    assert store.get("missing") is None and store.read_prefix("missing", 10) is None
    assert store.get_with_generation("small")[0] == b"s"
    assert store.read_prefix("small", 1000)[:2] == (frame(b"s"), True)
    assert store.bytes_read == inner.bytes_read == read + 2 * len(frame(b"s"))
    assert store.put_if_absent("new", b"n") and not store.put_if_absent("new", b"m")
    assert store.get("new") == b"n" and store.list("n") == ["new"]
    assert store.bytes_written == inner.bytes_written == written + len(frame(b"n"))
    assert store.delete("new") and not store.exists("new")
    (tmp_path / "bad").write_bytes(b"garbage, not a framed object")
    start = clock()
    with pytest.raises(CorruptObject, match="corrupt object 'bad'"):
        store.get("bad")
    assert clock() - start == pytest.approx(0.05)  # a failed read pays the latency only
    with pytest.raises(ValueError, match="bad store key"):
        store.put("../x", b"")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("100Mbit,50ms", (100e6, 0.05)),
        ("1Gbit", (1e9, 0.0)),
        ("0,10ms", (0.0, 0.01)),
        ("2.5Mbit,0.1s", (2.5e6, 0.1)),
        ("8 kbit/s, 1 s", (8e3, 1.0)),
        ("100Mbps,0", (100e6, 0.0)),
    ],
)
def test_parse_link_accepts(text, expected):
    assert parse_link(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text,message",
    [
        ("bogus", "rate 'bogus' is not a number+unit"),
        ("", "expected RATE[,LATENCY]"),
        ("100", "rate '100' has no unit"),
        ("100MB,50ms", "unknown unit 'MB'"),
        ("100Mbit,50", "latency '50' has no unit"),
        ("100Mbit,5min", "unknown unit 'min'"),
        ("-1Mbit", "is not a number+unit"),
        ("1Mbit,1ms,1", "expected RATE[,LATENCY]"),
        ("1e400Gbit", "is not finite"),
    ],
)
def test_parse_link_refuses_with_one_line(text, message):
    with pytest.raises(ValueError) as e:
        parse_link(text)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "such as 100Mbit,50ms" in str(e.value)  # and names the allowed form


def test_link_refuses_negative_parameters():
    with pytest.raises(ValueError, match="latency_s=-1 must be"):
        Link(1e6, -1)


def test_startup_checks_and_applies_the_link(tmp_path):
    with pytest.raises(UsageError, match="^--link: bad link 'bogus'"):
        startup.check_args(["prog"], store="/s", run="demo", poll_seconds=1, link="bogus")
    assert startup.check_args(["prog"], store="/s", run="demo", poll_seconds=1, link="") == "demo"
    store = startup.open_run(small_config(), str(tmp_path), "demo", None, "8Mbit,10ms")[2]
    assert isinstance(store, SlowLink)
    assert (store.link.bandwidth_bps, store.link.latency_s) == (8e6, 0.01)
    assert isinstance(startup.open_run(small_config(), str(tmp_path), "demo", None)[2], ObjectStore)


def test_cli_bad_link_is_one_line_and_exit_2(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    procs = Procs(tmp_path)
    try:
        args = [*MODEL, f"--store={store}", f"--run={RUN}", "--link=bogus"]
        procs.start("island", "island", *args, "--island=a")
        procs.start("aggregator", "aggregator", *args, "--rounds=2")
        for name, proc in procs.procs.items():
            proc.wait(timeout=120)
            err = procs.log(name).strip()
            assert proc.returncode == 2 and len(err.splitlines()) == 1, err
            assert f"{name}.py: error: --link: bad link 'bogus'" in err, err
    finally:
        procs.kill_all()
