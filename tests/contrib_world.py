"""Untrusted contributors, in process: an adversarial round protocol on a synthetic problem.

The model is a least-squares regression (params {"w", "b"}), so every round is fast and the
honest pseudo-gradients are real (H gradient steps on each island's own data); everything
else — store, signatures, registry, screening, scoring, robust rules, ledger — is the real
thing. Shared by the contributor tests (validator, checks, recorder, policy, signing, the CLI);
the five-round `adversarial_run` fixture in conftest.py is built from it.
"""

import functools
import hashlib

import jax
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import FakeClock

from near_jax.contrib import identity, registry
from near_jax.contrib.contributor import Signer
from near_jax.contrib.policy import Policy
from near_jax.contrib.validator import ContribAggregator
from near_jax.diloco import protocol
from near_jax.diloco.assignment import assigned_seed
from near_jax.diloco.robust import Rule
from near_jax.diloco.store import ObjectStore

RUN, SPEC, LR, MU, H = "adv", "int8", 0.7, 0.9, 5
DIM = 24
W_TRUE = np.random.default_rng(7).standard_normal(DIM).astype(np.float32)
LIKE = {"w": np.zeros(DIM, np.float32), "b": np.zeros((), np.float32)}
CODE, CONFIG = "c" * 64, "d" * 64
HONEST = [f"honest{i}" for i in range(6)]
ADVERSARIES = {
    "zero": ("free-rider", "replayed"),
    "copier": "copy",
    "poisoner": "norm outlier",
    "forger": "bad signature",
    "replayer": "replayed",
}


TOPIC = 0.5  # how far a "topic" batch's own optimum sits from W_TRUE


def batch(seed, n=64):
    """A batch of the regression. Batches of seed ("topic", stream, index) each have a topic:
    their own optimum W_TRUE + shift, so training on a batch improves it more than others
    (as a language model that trained on some pages predicts them best): the gauntlet's
    train data. The others ("train": the older tests' train data, val, eval) have none."""
    digest = hashlib.blake2b(repr(seed).encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    w = W_TRUE
    if seed[0] == "topic":
        w = W_TRUE + TOPIC * rng.standard_normal(DIM).astype(np.float32)
    y = x @ w + 0.5 + 0.1 * rng.standard_normal(n).astype(np.float32)
    return x, y


@functools.cache
def key_of(name):
    """Contributor `name`'s key (deterministic, so anyone can compute its assignment)."""
    seed = hashlib.sha256(b"contrib_world:" + name.encode()).digest()
    return identity.Identity(Ed25519PrivateKey.from_private_bytes(seed))


def assigned(name, rnd):
    """The stream seed of `name`'s assigned train batches in round `rnd`."""
    return assigned_seed(RUN, rnd, key_of(name).public_hex)


def train_loss(params, stream, index, tag="train"):
    """The aggregator's train loss: batch `index` of train stream `stream`."""
    x, y = batch((tag, stream, index))
    err = x @ np.asarray(params["w"]) + np.asarray(params["b"]) - y
    return float(np.mean(err**2))


def loss(params, seed):
    x, y = batch(("val", seed))
    err = x @ np.asarray(params["w"]) + np.asarray(params["b"]) - y
    return float(np.mean(err**2))


EVAL = batch(("eval", 0), n=1024)


def eval_loss(params):
    x, y = EVAL
    return float(np.mean((x @ params["w"] + params["b"] - y) ** 2))


def inner(params, island, rnd, lr=0.02, batches=None, tag="train"):
    """H steps of gradient descent on the island's assigned batches of round `rnd` (of kind
    `tag`; or on `batches(step)`: other data): Δ = θ_r − θ_island."""
    w, b = params["w"].copy(), params["b"].copy()
    stream = assigned(island, rnd)
    for step in range(H):
        x, y = batches(step) if batches else batch((tag, stream, step))
        err = x @ w + b - y
        w = w - lr * 2 * (x.T @ err) / len(y)
        b = b - lr * 2 * np.mean(err)
    return {"w": params["w"] - w.astype(np.float32), "b": params["b"] - np.float32(b)}


class World:
    """A run with registered contributors and an aggregator driven round by round."""

    def __init__(
        self,
        path,
        names,
        policy,
        aggregator_key=None,
        *,
        shard_bytes=protocol.DEFAULT_SHARD_BYTES,
        spec=SPEC,
        tag="train",
        allowlist=None,
    ):
        path.mkdir(parents=True, exist_ok=True)
        self.shard_bytes, self.spec = shard_bytes, spec  # the run's plan and compression
        self.tag = tag  # the kind of train batches: "topic" in the gauntlet
        self.allowlist = allowlist  # the run's allowlist entry (None: an open run)
        self.store = ObjectStore.open(str(path))
        self.clock, self.path, self.policy = FakeClock(), path, policy
        self.keys = {name: key_of(name) for name in names}
        self.agg_key = aggregator_key or identity.generate()
        self.agg = self.make_aggregator()
        self.agg.create(
            {"w": np.zeros(DIM, np.float32), "b": np.zeros((), np.float32)},
            {"inner_steps": H, **self.agg.manifest_fields()},
        )
        for name, key in self.keys.items():
            assert registry.register(self.store, RUN, name, key, self.clock())
        self.agg.load()
        self.pushed = {}  # round -> {name: delta}

    def make_aggregator(self):
        return ContribAggregator(
            self.store,
            RUN,
            LIKE,
            aggregator_key=self.agg_key,
            policy=self.policy,
            loss_fn=loss,
            train_loss_fn=functools.partial(train_loss, tag=self.tag),
            allowlist=self.allowlist,
            ledger_path=str(self.path / "local" / "ledger.sqlite"),
            spec=self.spec,
            shard_bytes=self.shard_bytes,
            lr=LR,
            momentum=MU,
            quorum=1,
            round_timeout=30.0,
            poll_seconds=1.0,
            clock=self.clock,
            sleep=self.clock.sleep,
        )

    def base(self):
        return protocol.pull_version(self.store, RUN, self.agg.state.version, self.agg.plan)

    def tree(self, base):
        """The params of a pulled version as a tree."""
        return base.tree(self.agg.plan)

    def push(self, name, delta, key=None, base=None):
        signer = Signer(key or self.keys[name], name, CODE, CONFIG, store=self.store)
        plan = self.agg.plan
        written, _, _ = protocol.push_contribution(
            self.store,
            RUN,
            name,
            base or self.base(),
            plan,
            plan.split(delta),
            self.spec,
            sign=signer,
        )
        assert written
        self.pushed.setdefault(self.agg.state.version, {})[name] = delta

    def decoded(self, rnd, name):
        return protocol.read_contribution(self.store, RUN, rnd, self.agg.plan, name)


def adversarial_round(world, adversaries=True):
    """Every island pushes for the current round, then the aggregator closes it."""
    base, r = world.base().tree(world.agg.plan), world.agg.state.version
    for name in HONEST:
        world.push(name, inner(base, name, r))
    if adversaries:
        world.push("zero", jax.tree.map(np.zeros_like, base))
        world.push("poisoner", jax.tree.map(lambda d: -10 * d, inner(base, "p", r)))
        world.push("forger", inner(base, "forger", r), key=identity.generate())
        if r > 0:  # an earlier round's payload, re-signed for this round
            world.push("replayer", world.decoded(r - 1, "honest3"))

        def copy():  # runs once the aggregator has seen honest2's contribution
            noise = np.random.default_rng(r).standard_normal(DIM).astype(np.float32)
            stolen = world.decoded(r, "honest2")
            stolen["w"] = stolen["w"] + 1e-4 * np.linalg.norm(stolen["w"]) * noise / DIM
            world.push("copier", stolen)

        world.clock.on_sleep.append(copy)
    # Closed by the deadline (the fake clock makes it instant), after the copier's push.
    world.agg.quorum, world.agg.round_timeout = 100, 2.0
    stats = world.agg.run_round()
    assert stats["reason"] == "deadline" and not world.clock.on_sleep
    return stats["decision"]


POLICY = Policy(
    rule=Rule("trimmed_mean", trim_fraction=0.2),
    allowed_code=(CODE,),
    config_sha256=CONFIG,
    score_batches=1,
    new_keys_per_round=0,  # eleven newcomers in round 0
    assigned_data=False,  # its train batches have no topics: the gauntlet checks that
)
NAMES = HONEST + list(ADVERSARIES)


def close_round(world, quorum=100):
    """Closes the current round by its deadline (instant on the fake clock); the decision."""
    world.agg.quorum, world.agg.round_timeout = quorum, 2.0
    return world.agg.run_round()["decision"]


def by_contributor(decision):
    """A decision's contrib entries by contributor name."""
    return {e["contributor"]: e for e in decision["contrib"]["entries"]}


# ------------------------------------------------------------------------------ gauntlet
# The adversarial harness of issue 16 (also `bench/contrib.py --adversarial`): honest
# contributors train on their assignments; the adversaries cheat cheaply.

GAUNTLET_POLICY = Policy(
    rule=Rule("trimmed_mean", trim_fraction=0.2),
    allowed_code=(CODE,),
    config_sha256=CONFIG,
    score_batches=1,
    assigned_batches=H,
    new_keys_per_round=4,
)
SYBILS = [f"sybil{i:02d}" for i in range(20)]
CHEATS = {
    "lazy": "trains on data it chose, not its assignment",
    "valtrained": "trains on the scoring (val) split",
    "nearcopy": "pushes an honest Δ plus noise (cosine < 0.99)",
}


def lazy_delta(base, r):
    """Honest work on batches it chose (cached data, another stream): not its assignment."""
    return inner(base, "lazy", r, batches=lambda j: batch(("topic", ("its own", r), j)))


def valtrained_delta(base, r):
    """Trained on the scoring split (val batches), hoping to score high."""
    return inner(base, "valtrained", r, batches=lambda j: batch(("val", ("guess", r, j))))


def screening_cosine(a, b):
    """The plain cosine of two trees (what the 0.99 copy threshold is compared with)."""
    from near_jax.contrib import screening

    return screening.cosine(a, b)


def near_copy(delta, r, noise=0.15):
    """`delta` plus Gaussian noise of `noise` × its norm (cosine with it ≈ 1/√(1+noise²))."""
    rng = np.random.default_rng(r + 1000)
    out = {}
    for k, d in delta.items():
        n = rng.standard_normal(np.shape(d)).astype(np.float32)
        scale = noise * np.linalg.norm(d) / max(np.linalg.norm(n), 1e-12)
        out[k] = (d + scale * n).astype(np.float32)
    return out


def gauntlet_round(world, cheats=(), sybils=()):
    """Honest contributors push, then the cheats (copies read what they copy from the store,
    so they come after it), then the aggregator closes the round by its deadline."""
    base, r = world.tree(world.base()), world.agg.state.version
    for name in HONEST:
        world.push(name, inner(base, name, r, tag="topic"))
    if "lazy" in cheats:
        world.push("lazy", lazy_delta(base, r))
    if "valtrained" in cheats:
        world.push("valtrained", valtrained_delta(base, r))
    if "nearcopy" in cheats:
        world.push("nearcopy", near_copy(world.decoded(r, "honest1"), r))
    for i, name in enumerate(sybils):  # copies of the honest Δs, exact or near
        stolen = world.decoded(r, HONEST[i % len(HONEST)])
        world.push(name, stolen if i % 2 else near_copy(stolen, r + i, noise=0.02))
    return close_round(world)


def gauntlet(path, rounds, cheats=(), sybils=(), policy=GAUNTLET_POLICY, **world_kwargs):
    """(world, decisions, eval loss after each round) of a run of `rounds` gauntlet rounds."""
    world = World(path, HONEST + list(cheats) + list(sybils), policy, tag="topic", **world_kwargs)
    decisions, losses = [], []
    for _ in range(rounds):
        decisions.append(gauntlet_round(world, cheats, sybils))
        losses.append(eval_loss(world.tree(world.base())))
    world.agg.close()
    return world, decisions, losses


def allowlist_of(names, key=None):
    """The allowlist entry of a run created from a (signed) promotion of `names`."""
    from near_jax.contrib import allowlist

    rows = [
        {"contributor": n, "key_id": key_of(n).key_id, "public_key": key_of(n).public_hex}
        for n in names
    ]
    doc = allowlist.sign_promotion(
        key or identity.generate(), "rung0", rows, window=0, top=len(rows), issued_at=0
    )
    return allowlist.read_promotion(protocol.dumps(doc)).manifest_entry()


def rewards_by_contributor(decisions):
    """Each contributor's total reward over the decisions."""
    totals = {}
    for d in decisions:
        for e in d["contrib"]["entries"]:
            totals[e["contributor"]] = totals.get(e["contributor"], 0.0) + e["reward"]
    return totals
