"""Standings, windows, promotion and the CSV, from hand-made ledger entries."""

import csv
import io

from near_jax.contrib import rewards


def entry(
    rnd, who, *, score=None, accepted=False, applied=False, reason="", reward=0.0, key_id="k"
):
    return {
        "round": rnd,
        "contributor": who,
        "key_id": key_id,
        "score": score,
        "accepted": accepted,
        "applied": applied,
        "reason": reason,
        "reward": reward,
    }


ENTRIES = [
    entry(0, "ann", score=0.3, accepted=True, applied=True, reward=0.6),
    entry(0, "bob", score=0.2, accepted=True, applied=True, reward=0.4),
    entry(0, "eve", reason="copy: near-duplicate of ann (cosine 0.9999)"),
    entry(1, "ann", score=0.1, accepted=True, applied=True, reward=0.25),
    entry(1, "bob", score=0.3, accepted=True, applied=True, reward=0.75),
    entry(1, "eve", reason="bad signature (registered key id 12)", key_id=""),
    entry(1, "zed", reason="replayed: signed for round 0, which is closed (now 1)", key_id=""),
    entry(2, "zed", score=0.5, accepted=True, applied=True, reward=1.0),
]


def test_standings_sum_rewards_and_rank_best_first():
    ranked = rewards.standings(ENTRIES)
    assert [s.contributor for s in ranked] == ["bob", "zed", "ann", "eve"]
    bob = ranked[0]
    assert bob.reward == 1.15 and bob.accepted == 2 and bob.mean_score == 0.25
    assert len(bob.rounds) == 2 and bob.last_round == 1
    eve = ranked[-1]
    assert eve.rejected == 2 and eve.flags == {"copy": 1}  # the unsigned one is not counted


def test_only_signed_cheating_disqualifies():
    ranked = rewards.standings(ENTRIES)
    chosen = [s.contributor for s in rewards.promotable(ranked, top=5)]
    assert chosen == ["bob", "zed", "ann"]  # zed's unsigned "replay" was someone else's
    assert [s.contributor for s in rewards.promotable(ranked, top=5, min_rounds=2)] == [
        "bob",
        "ann",
    ]
    assert [s.contributor for s in rewards.promotable(ranked, top=1)] == ["bob"]


def test_window_counts_back_from_the_latest_closed_round():
    assert rewards.window_bounds(latest=3, window=2) == (1, 2)
    assert rewards.window_bounds(latest=3, window=0) == (0, 2)
    assert rewards.window_bounds(latest=0, window=5) == (0, -1)  # nothing closed yet
    ranked = rewards.standings(ENTRIES, *rewards.window_bounds(latest=3, window=1))
    assert [(s.contributor, s.reward) for s in ranked] == [("zed", 1.0)]


def test_csv_and_table_show_every_contributor():
    ranked = rewards.standings(ENTRIES)
    rows = list(csv.DictReader(io.StringIO(rewards.to_csv(ranked))))
    assert [r["contributor"] for r in rows] == ["bob", "zed", "ann", "eve"]
    assert float(rows[0]["reward"]) == 1.15 and rows[-1]["flags"] == "copy=1"
    lines = rewards.table(ranked).splitlines()
    assert len(lines) == 5 and lines[1].split()[1] == "bob"
