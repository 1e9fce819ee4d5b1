"""The order to submit independent tasks of known size in, so that the workers finish them together.

Workers take the next task as each becomes free (list scheduling). Largest first (LPT) keeps small tasks for the
end, but the last few still often leave one worker idle while another finishes a mid-size task (a slide's blocks
hold from a few to 256 tiles). ``balanced_order`` starts from LPT and swaps pairs of the last tasks while that lowers
the mean time the last worker finishes, simulated over a few draws of the sizes with noise (real task times vary by
several percent), so the order does not rely on exact sizes. Only the last ``window`` tasks are reordered: the cost
(a few ms) does not grow with the number of tasks. Measured: ``benchmarks/README.md``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

SAMPLES = 16  # noisy draws of the task sizes each order is simulated over
SPREAD = 0.05  # relative standard deviation of a task's real time around its estimate
WINDOW = 10  # only the last tasks are reordered: they decide how the workers finish
MAX_PASSES = 8


def balanced_order(costs: Sequence[float], workers: int, *, samples: int = SAMPLES, spread: float = SPREAD,
                   window: int = WINDOW, seed: int = 0) -> list[int]:
    """Indices of ``costs`` in the order to submit them to ``workers`` identical workers that start together.

    The ``workers`` largest go first (every worker starts on one), then the rest largest first, with pairwise swaps
    among the last ``window`` positions kept while they lower the mean finishing time of the last worker (the
    makespan) over ``samples`` draws of the costs, each scaled by a factor around 1 (standard deviation ``spread``).
    Deterministic for given arguments.
    """
    costs = np.asarray(costs, dtype=np.float64)
    order = sorted(range(len(costs)), key=lambda i: -costs[i])  # stable: equal sizes keep their given order
    workers = max(1, int(workers))
    start = max(workers, len(order) - window)
    if workers == 1 or len(order) - start < 2:
        return order
    gauss = random.Random(seed).gauss  # the stdlib's: numpy.random is imported on first use (~10 ms)
    noise = np.array([[gauss(0.0, spread) for _ in range(len(costs))] for _ in range(samples)])
    draws = costs[None, :] * np.clip(1.0 + noise, 0.5, 1.5)
    ready = _simulate(draws, np.asarray([order[:start]]), np.zeros((1, samples, workers)))[0]  # the fixed prefix
    tail = np.asarray(order[start:])
    pairs = [(i, j) for i in range(len(tail)) for j in range(i + 1, len(tail))]
    best = _makespans(draws, tail[None, :], ready)[0]
    for _ in range(MAX_PASSES):
        candidates = np.repeat(tail[None, :], len(pairs), axis=0)
        rows = np.arange(len(pairs))
        first, second = np.asarray(pairs).T
        candidates[rows, first], candidates[rows, second] = tail[second], tail[first]
        spans = _makespans(draws, candidates, ready)
        pick = int(np.argmin(spans))
        if spans[pick] >= best * (1 - 1e-9):
            break
        best, tail = spans[pick], candidates[pick]
    return order[:start] + [int(i) for i in tail]


def _simulate(draws: np.ndarray, orders: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Each worker's finishing time (candidates, samples, workers) after running ``orders`` (candidates, tasks) from
    ``free`` (1 or candidates, samples, workers) by list scheduling: each task goes to the worker free first."""
    free = np.repeat(free, len(orders), axis=0) if len(free) != len(orders) else free.copy()
    k, s = np.meshgrid(np.arange(free.shape[0]), np.arange(free.shape[1]), indexing="ij")
    for step in range(orders.shape[1]):
        took = free.argmin(axis=2)
        free[k, s, took] += draws[:, orders[:, step]].T
    return free


def _makespans(draws: np.ndarray, orders: np.ndarray, ready: np.ndarray) -> np.ndarray:
    """Mean over the samples of the last worker's finishing time, per candidate order."""
    return _simulate(draws, orders, ready[None]).max(axis=2).mean(axis=1)
