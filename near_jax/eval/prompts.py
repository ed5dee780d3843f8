"""Requests: every (example, choice) pair of a task as a prompt and a continuation.

    shot         = context_j + target_delimiter + choices_j[answer_j]
    prompt       = shot_1 + fewshot_delimiter + ... + shot_k + fewshot_delimiter + context
    continuation = target_delimiter + choice

with target_delimiter " " and fewshot_delimiter "\\n\\n" by default. The k = num_fewshot shots
are drawn without replacement from the few-shot pool (the task itself, or a separate file) by
a generator seeded with (seed, example index), so a prompt depends only on the seed and the
example; a pool entry with the example's own context and choices is never drawn.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from near_jax.eval.taskfile import Example, TaskError


@dataclasses.dataclass(frozen=True)
class Request:
    """One (example, choice) pair to score: log p(continuation | prompt)."""

    example: int  # index of the example in its task
    choice: int  # index of the choice in the example
    prompt: str
    continuation: str


class FewshotSampler:
    """Draws the few-shot examples for each evaluated example from a pool, deterministically."""

    def __init__(self, pool: Sequence[Example], num_fewshot: int, seed: int):
        if num_fewshot < 0 or seed < 0:
            raise TaskError(f"num_fewshot={num_fewshot}, seed={seed}: both must be >= 0")
        self.pool, self.num_fewshot, self.seed = pool, num_fewshot, seed
        # Pool indices by (context, choices), so excluding an example is a lookup, not a scan.
        self._by_key: dict[tuple, list[int]] = collections.defaultdict(list)
        for j, shot in enumerate(pool):
            self._by_key[_key(shot)].append(j)

    def indices(self, example_index: int, example: Example) -> list[int]:
        """Pool indices of the shots for `example`, in prompt order; never the example."""
        if self.num_fewshot == 0:
            return []
        excluded = self._by_key.get(_key(example), [])
        # Draw enough that dropping the excluded entries still leaves num_fewshot.
        draw = self.num_fewshot + len(excluded)
        if draw > len(self.pool):
            raise TaskError(
                f"num_fewshot={self.num_fewshot} is not allowed: the few-shot pool has only "
                f"{len(self.pool) - len(excluded)} examples other than example {example_index}"
            )
        rng = np.random.default_rng([self.seed, example_index])
        picks = rng.choice(len(self.pool), size=draw, replace=False).tolist()
        return [j for j in picks if j not in excluded][: self.num_fewshot]


def _key(example: Example) -> tuple:
    return (example.context, example.choices)


def render_shot(example: Example, target_delimiter: str = " ") -> str:
    """A solved example as it appears in a few-shot prompt: context + delimiter + answer."""
    return example.context + target_delimiter + example.choices[example.answer]


def build_requests(
    examples: Sequence[Example],
    *,
    num_fewshot: int = 0,
    seed: int = 0,
    fewshot_pool: Sequence[Example] | None = None,
    target_delimiter: str = " ",
    fewshot_delimiter: str = "\n\n",
) -> list[Request]:
    """One request per (example, choice), example-major (prompt shape: module docstring).

    `fewshot_pool` defaults to `examples` itself.
    """
    sampler = FewshotSampler(examples if fewshot_pool is None else fewshot_pool, num_fewshot, seed)
    requests = []
    for i, example in enumerate(examples):
        shots = [
            render_shot(sampler.pool[j], target_delimiter) for j in sampler.indices(i, example)
        ]
        prompt = "".join(shot + fewshot_delimiter for shot in shots) + example.context
        for c, choice in enumerate(example.choices):
            requests.append(Request(i, c, prompt, target_delimiter + choice))
    return requests
