"""Building a contributor run's aggregator (`near_jax.contrib.building`): scoring losses,
the assigned-data train loss, refusals of unusable keys and sources."""

import jax
import pytest
from contrib_world import LR, MU, RUN, SPEC

from near_jax.contrib import building, identity
from near_jax.contrib.policy import Policy


def test_scoring_draws_fresh_batches_per_seed_from_a_private_source(tmp_path):
    from helpers import small_config

    from near_jax import sharding
    from near_jax.train.loop import trainer_for

    private = tmp_path / "private"
    private.mkdir()
    for i in range(40):  # text the contributors never see
        (private / f"{i}.txt").write_text(f"held-out document {i}: " + "xyzzy plugh " * (5 + i))
    cfg = small_config()
    trainer = trainer_for(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    params = jax.device_get(trainer.init(jax.random.key(0)).params)
    public = building.scoring_loss(trainer, 1)
    hidden = building.scoring_loss(trainer, 1, source=str(private))
    a, b = hidden(params, 1), hidden(params, 2)
    assert a != b and hidden(params, 1) == a  # a seed is one draw, reproducible
    assert public(params, 1) not in (a, b)  # another text: the public val split differs
    with pytest.raises(ValueError, match="--score_source=.*nope"):
        building.build(
            cfg,
            trainer,
            None,
            RUN,
            None,
            key_path=_keyfile(tmp_path),
            ledger_path=str(tmp_path / "l.sqlite"),
            score_source=str(tmp_path / "nope"),
            spec=SPEC,
            lr=LR,
            momentum=MU,
            quorum=1,
            round_timeout=1.0,
        )


def _keyfile(tmp_path):
    path = tmp_path / "agg.key"
    identity.save(identity.generate(), path)
    return str(path)


def test_a_run_that_checks_assigned_data_gets_the_train_loss_of_its_assignments(tmp_path):
    from helpers import small_config

    from near_jax import sharding
    from near_jax.diloco import assignment
    from near_jax.train.loop import trainer_for

    cfg = small_config()
    cfg.contrib.enabled = True
    trainer = trainer_for(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    params = jax.device_get(trainer.init(jax.random.key(0)).params)
    kwargs = dict(spec=SPEC, lr=LR, momentum=MU, quorum=1, round_timeout=1.0)
    key = _keyfile(tmp_path)

    def build(ledger):
        return building.build(
            cfg, trainer, None, RUN, None, key_path=key, ledger_path=str(ledger), **kwargs
        )

    agg = build(tmp_path / "l.sqlite")
    assert agg.policy.assigned_data and isinstance(agg.policy, Policy)
    want = assignment.loss_fn(trainer)(params, 7, 1)
    assert agg.train_loss_fn(params, 7, 1) == pytest.approx(want, rel=1e-6)
    cfg.contrib.assigned_data = False
    assert build(tmp_path / "m.sqlite").train_loss_fn is None
