"""Tests of near_jax.diloco.startup, in-process: the checks both DiLoCo programs make before
their loops (each a one-line UsageError). The programs' exit status 2 on them is tested as
processes in test_islands.py."""

import pytest
from helpers import small_config

from near_jax.diloco import protocol, startup
from near_jax.diloco.startup import UsageError
from near_jax.diloco.store import ObjectStore


def check_args(argv=("prog",), store="/s", run="demo", poll_seconds=0.5):
    return startup.check_args(list(argv), store=store, run=run, poll_seconds=poll_seconds)


def test_check_args_returns_the_run():
    assert check_args() == "demo"


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"argv": ("prog", "extra", "more")}, "unexpected arguments: extra more"),
        ({"store": None}, "--store is required"),
        ({"store": ""}, "--store is required"),
        ({"run": None}, "--run is required"),
        ({"run": "../x"}, "bad run name '../x'"),
        ({"run": "a" * 65}, "bad run name"),
        ({"poll_seconds": 0.0}, "--poll_seconds=0.0 must be positive"),
        ({"poll_seconds": -1.0}, "--poll_seconds=-1.0 must be positive"),
    ],
)
def test_check_args_refuses_with_one_line(kw, message):
    with pytest.raises(UsageError) as e:
        check_args(**kw)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_usage_error_is_a_value_error():
    assert issubclass(UsageError, ValueError)


def test_manifest_fields_are_the_model_and_data_a_run_fixes():
    cfg = small_config()
    fields = startup.manifest_fields(cfg)
    assert fields == {
        "model": cfg.model.to_dict(),
        "data": {"seq_len": 32, "tokenizer": cfg.data.tokenizer},
    }


def test_manifest_problem_names_the_first_differing_field():
    cfg = small_config()
    manifest = {"run": "demo", **startup.manifest_fields(cfg)}
    assert startup.manifest_problem(manifest, cfg) is None
    assert startup.manifest_problem(manifest, small_config(n_layers=3)) == (
        "config.model.n_layers=3 is not allowed: run 'demo' uses 2"
    )
    other = small_config()
    other.data.seq_len = 64
    assert startup.manifest_problem(manifest, other) == (
        "config.data.seq_len=64 is not allowed: run 'demo' uses 32"
    )
    two = small_config(n_layers=3, d_model=128)  # sorted: d_model comes first
    assert startup.manifest_problem(manifest, two).startswith("config.model.d_model=128 ")


def test_manifest_problem_names_fields_the_run_lacks_or_only_it_has():
    cfg = small_config()
    manifest = {"run": "demo", **startup.manifest_fields(cfg)}
    del manifest["data"]["tokenizer"]
    assert startup.manifest_problem(manifest, cfg) == (
        f"config.data.tokenizer={cfg.data.tokenizer!r} is not allowed: run 'demo' uses None"
    )
    manifest = {"run": "demo", **startup.manifest_fields(cfg)}
    manifest["model"]["extra"] = 1
    assert startup.manifest_problem(manifest, cfg) == (
        "config.model.extra=None is not allowed: run 'demo' uses 1"
    )


def test_open_run_of_a_new_run(tmp_path):
    (tmp_path / "store").mkdir()
    cfg, mesh, store, manifest = startup.open_run(
        small_config(), str(tmp_path / "store"), "demo", str(tmp_path / "work")
    )
    assert manifest is None and (tmp_path / "work").is_dir()
    assert cfg.model.vocab_size == 384 and mesh.size >= 1
    assert store.list("") == []


def test_open_run_checks_the_config_against_the_runs_manifest(tmp_path):
    store = ObjectStore.open(str(tmp_path))
    manifest = {"run": "demo", **startup.manifest_fields(small_config())}
    store.put(protocol.manifest_key("demo"), protocol.dumps(manifest))
    assert startup.open_run(small_config(), str(tmp_path), "demo", None)[3] == manifest
    with pytest.raises(UsageError, match="^config.model.n_layers=3 is not allowed"):
        startup.open_run(small_config(n_layers=3), str(tmp_path), "demo", None)


def test_open_run_refuses_with_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "store").mkdir()
    cases = [
        ((small_config(), str(tmp_path / "store"), "demo", str(afile)), "--workdir="),
        ((small_config(), str(tmp_path / "nope"), "demo", None), "does not exist"),
    ]
    bad = small_config()
    bad.train.global_batch_size = 3  # does not divide the data axis
    cases.append(((bad, str(tmp_path / "store"), "demo", None), "batch"))
    store = ObjectStore.open(str(tmp_path / "store"))
    store.put(protocol.manifest_key("junk"), b"[1]")
    cases.append(((small_config(), str(tmp_path / "store"), "junk", None), "not a JSON object"))
    for args, message in cases:
        with pytest.raises(UsageError) as e:
            startup.open_run(*args)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert store.list("") == [protocol.manifest_key("junk")]
