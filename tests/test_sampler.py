"""The priority sampler draws exactly the law P_t(x) = π(x) / Σ_{y ∈ D∖S_t} π(y) (docs/methods.md §4), checked statistically
against the definition, plus determinism, epochs, and the split between data-parallel ranks."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import chi2_contingency, chisquare

from apollo_ray.data.mixture import priority_order, rank_slice

PRI = np.array([16.0, 16.0, 2.0, 2.0])
EPOCHS = np.array([1, 1, 2, 2])
DRAWS = 20000
ALPHA = 1e-3


def sequential_order(priorities: np.ndarray, epochs: np.ndarray, seed: int) -> np.ndarray:
    """The definition, draw by draw: O(N²), the reference for the fast sampler."""
    rng = np.random.default_rng(seed)
    pool = list(np.repeat(np.arange(len(priorities)), epochs))
    out = []
    while pool:
        w = np.asarray(priorities, dtype=float)[pool]
        out.append(pool.pop(rng.choice(len(pool), p=w / w.sum())))
    return np.asarray(out, dtype=np.int64)


def exact_sequence_law(priorities: np.ndarray, epochs: np.ndarray) -> dict[tuple[int, ...], float]:
    """P(order) from the definition, by enumerating every order of the copies (copies of an item are merged)."""
    copies = list(np.repeat(np.arange(len(priorities)), epochs))
    law: dict[tuple[int, ...], float] = Counter()
    for perm in itertools.permutations(range(len(copies))):
        left, p = float(sum(priorities[c] for c in copies)), 1.0
        for k in perm:
            p *= priorities[copies[k]] / left
            left -= priorities[copies[k]]
        law[tuple(int(copies[k]) for k in perm)] += p
    return dict(law)


def _draw(sampler: Callable[[np.ndarray, np.ndarray, int], np.ndarray], n: int = DRAWS) -> list[tuple[int, ...]]:
    return [tuple(int(x) for x in sampler(PRI, EPOCHS, seed)) for seed in range(n)]


def _pvalues(orders: list[tuple[int, ...]]) -> dict[str, float]:
    """Chi-square p-values of the drawn orders against the exact law: first draw, item at each position, and the
    whole order (orders with expected count < 5 pooled into one bin, as the test requires)."""
    law = exact_sequence_law(PRI, EPOCHS)
    n = len(orders)
    out: dict[str, float] = {}
    length = len(next(iter(law)))
    for t in range(length):
        exp = np.zeros(len(PRI))
        for seq, p in law.items():
            exp[seq[t]] += p
        obs = np.bincount([o[t] for o in orders], minlength=len(PRI))
        out[f"position {t}"] = chisquare(obs, exp * n).pvalue
    counts = Counter(orders)
    common = [s for s, p in law.items() if p * n >= 5]
    obs = [counts[s] for s in common]
    exp = [law[s] * n for s in common]
    obs.append(n - sum(obs))
    exp.append(n - sum(exp))
    out["whole order"] = chisquare(obs, exp).pvalue
    return out


def test_exact_law_is_a_distribution():
    law = exact_sequence_law(PRI, EPOCHS)
    assert len(law) == 180  # 6! / (2! 2!)
    assert sum(law.values()) == pytest.approx(1.0)
    first = Counter()
    for s, p in law.items():
        first[s[0]] += p
    assert [first[i] for i in range(4)] == pytest.approx([16 / 40, 16 / 40, 4 / 40, 4 / 40])


def test_law_matches_definition():
    p = _pvalues(_draw(priority_order))
    assert min(p.values()) > ALPHA, p


@pytest.mark.parametrize("wrong", ["uniform shuffle", "linear keys"])
def test_law_test_rejects_wrong_samplers(wrong: str):
    """The test above has power: plausible but wrong samplers fail it."""
    def uniform(pri: np.ndarray, ep: np.ndarray, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(pri)), ep))

    def linear(pri: np.ndarray, ep: np.ndarray, seed: int) -> np.ndarray:
        items = np.repeat(np.arange(len(pri)), ep)  # key U/π: favours high π, but not with the right law
        return items[np.argsort(np.random.default_rng(seed).random(len(items)) / pri[items])]

    p = _pvalues(_draw({"uniform shuffle": uniform, "linear keys": linear}[wrong]))
    assert p["whole order"] < ALPHA, p


def test_sequential_reference_agrees():
    """The fast sampler and the draw-by-draw definition give the same position table (two-sample test)."""
    n = 3000
    fast = _draw(priority_order, n)
    slow = _draw(sequential_order, n)
    for t in range(len(fast[0])):
        table = np.stack([np.bincount([o[t] for o in fast], minlength=4),
                          np.bincount([o[t] for o in slow], minlength=4)])
        assert chi2_contingency(table).pvalue > ALPHA / 6


def test_deterministic_and_epochs():
    rng = np.random.default_rng(0)
    pri = rng.choice([2.0, 16.0], size=500)
    ep = rng.integers(0, 4, size=500)
    a, b = priority_order(pri, ep, seed=7), priority_order(pri, ep, seed=7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, priority_order(pri, ep, seed=8))
    assert np.array_equal(np.bincount(a, minlength=500), ep)


def test_high_priority_comes_first():
    pri = np.array([16.0] * 500 + [2.0] * 500)
    order = priority_order(pri, np.ones(1000, dtype=int), seed=3)
    pos = np.empty(1000)
    pos[order] = np.arange(1000)
    assert pos[:500].mean() < 0.7 * pos[500:].mean()
    # the curriculum: the first tenth is mostly high priority, the last tenth mostly low
    assert (order[:100] < 500).mean() > 0.8 and (order[-100:] >= 500).mean() > 0.8


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        priority_order(np.array([1.0, 0.0]), np.array([1, 1]), 0)
    with pytest.raises(ValueError):
        priority_order(np.array([1.0, 2.0]), np.array([1]), 0)
    with pytest.raises(ValueError):
        priority_order(np.array([1.0]), np.array([-1]), 0)


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_rank_slices_partition_and_resume(world_size: int):
    order = priority_order(np.linspace(1, 16, 101), np.full(101, 2), seed=1)
    slices = [rank_slice(order, r, world_size) for r in range(world_size)]
    # union = whole order, no overlap: every position is taken by exactly one rank
    taken = np.concatenate([rank_slice(np.arange(len(order)), r, world_size) for r in range(world_size)])
    assert sorted(taken.tolist()) == list(range(len(order)))
    assert sum(len(s) for s in slices) == len(order)
    assert Counter(np.concatenate(slices).tolist()) == Counter(order.tolist())
    # ranks stay at the same point of the curriculum: lengths differ by at most one
    assert max(map(len, slices)) - min(map(len, slices)) <= 1
    # resume after k items per rank continues exactly
    for k in (0, 5, 17):
        for r in range(world_size):
            assert np.array_equal(rank_slice(order, r, world_size, start=k * world_size), slices[r][k:])
    with pytest.raises(ValueError):
        rank_slice(order, world_size, world_size)
