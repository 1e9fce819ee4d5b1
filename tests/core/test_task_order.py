"""balanced_order: a permutation, largest first, and workers that finish closer together than largest-first."""

import heapq

import numpy as np
import pytest

from pipeline.core.task_order import balanced_order

# Tissue tiles per block of the 1-gigapixel benchmark slide (13 blocks of up to 16 x 16 tiles).
BENCH_BLOCKS = [256, 253, 245, 193, 183, 171, 135, 122, 110, 108, 91, 26, 17]


def _finish_times(order, costs, workers, draws=2000, spread=0.05, seed=123):
    """(mean makespan, mean idle time of the first worker to finish) of list scheduling ``order``, over noisy draws
    made independently of ``balanced_order``'s own."""
    rng = np.random.default_rng(seed)
    spans, gaps = [], []
    for _ in range(draws):
        real = np.asarray(costs, float) * (1 + spread * rng.standard_normal(len(costs))) + 2.0
        free = [0.0] * workers
        for i in order:
            heapq.heappush(free, heapq.heappop(free) + real[i])
        spans.append(max(free))
        gaps.append(max(free) - min(free))
    return float(np.mean(spans)), float(np.mean(gaps))


def _largest_first(costs):
    return sorted(range(len(costs)), key=lambda i: -costs[i])


def test_a_permutation_that_starts_with_the_largest_tasks():
    order = balanced_order(BENCH_BLOCKS, 2)
    assert sorted(order) == list(range(len(BENCH_BLOCKS)))
    assert [BENCH_BLOCKS[i] for i in order[:2]] == [256, 253]  # every worker starts on one of the largest


def test_the_benchmark_slide_finishes_sooner_and_together():
    lpt = _finish_times(_largest_first(BENCH_BLOCKS), BENCH_BLOCKS, 2)
    balanced = _finish_times(balanced_order(BENCH_BLOCKS, 2), BENCH_BLOCKS, 2)
    assert balanced[0] < lpt[0] - 5  # the makespan, in tiles' time
    assert balanced[1] < 0.6 * lpt[1]  # the time one worker waits for the other at the end


@pytest.mark.parametrize("seed", range(6))
def test_never_worse_than_largest_first_on_random_blocks(seed):
    rng = np.random.default_rng(seed)
    costs = [int(c) for c in rng.integers(1, 257, rng.integers(4, 40))]
    workers = int(rng.choice([2, 3, 4, 8]))
    order = balanced_order(costs, workers)
    assert sorted(order) == list(range(len(costs)))
    assert _finish_times(order, costs, workers)[0] <= _finish_times(_largest_first(costs), costs, workers)[0] * 1.002


def test_one_worker_few_tasks_and_ties_keep_largest_first():
    assert balanced_order([5, 9, 1], 1) == [1, 0, 2]
    assert balanced_order([5, 9], 4) == [1, 0]
    assert balanced_order([], 2) == []
    assert balanced_order([7, 7, 7], 2) == [0, 1, 2]


def test_deterministic_and_only_the_last_window_moves():
    rng = np.random.default_rng(9)
    costs = [int(c) for c in rng.integers(1, 257, 60)]
    order = balanced_order(costs, 4, window=10)
    assert order == balanced_order(costs, 4, window=10)
    assert order[:50] == _largest_first(costs)[:50]
    assert sorted(order[50:]) == sorted(_largest_first(costs)[50:])
