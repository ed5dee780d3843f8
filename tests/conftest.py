"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402 - after the environment is set


@pytest.fixture(scope="session")
def saved_run(tmp_path_factory):
    """A run directory with a checkpoint at step 5 of the small byte-tokenizer model."""
    from helpers import save_run, small_config

    workdir = tmp_path_factory.mktemp("saved_run")
    save_run(workdir, small_config())
    return workdir


@pytest.fixture
def started(tmp_path):
    """(store, clock, aggregator) of a DiLoCo run created at version 0 (helpers.started_run)."""
    from helpers import started_run

    return started_run(tmp_path)


@pytest.fixture(scope="session")
def adversarial_run(tmp_path_factory):
    """(world, decisions) of five adversarial rounds of tests/contrib_world.py's run."""
    from contrib_world import NAMES, POLICY, World, adversarial_round

    world = World(tmp_path_factory.mktemp("adversarial"), NAMES, POLICY)
    decisions = [adversarial_round(world) for _ in range(5)]
    world.agg.close()
    return world, decisions


@pytest.fixture
def ledger_path(tmp_path):
    """A ledger with rounds 0 and 1 (5 entries) of tests/ledger_rows.py."""
    from ledger_rows import make_ledger

    return make_ledger(str(tmp_path / "ledger.sqlite"))


@pytest.fixture(scope="session")
def small_params():
    """Params of the small_config() model, initialized with key 0 (not to be modified)."""
    import jax
    from helpers import small_config

    from near_jax import model

    return model.init(model.ModelConfig.from_config(small_config().model), jax.random.key(0))


@pytest.fixture(scope="session")
def two_steps(tmp_path_factory):
    """A run with checkpoints at steps 3 and 5 (copy it before damaging it)."""
    from helpers import save_run, small_config

    workdir = tmp_path_factory.mktemp("two_steps")
    save_run(workdir, small_config(), steps=(3, 5))
    return workdir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """tests/contrib_world.py's adversarial run, helpers.ADVERSARIAL_ROUNDS rounds closed by
    the real aggregator (one per module: test_audit.py, test_contrib_cli.py)."""
    from contrib_world import NAMES, POLICY, World, adversarial_round
    from helpers import ADVERSARIAL_ROUNDS

    w = World(tmp_path_factory.mktemp("contrib_cli") / "store", NAMES, POLICY)
    for _ in range(ADVERSARIAL_ROUNDS):
        adversarial_round(w)
    w.agg.close()
    return w
