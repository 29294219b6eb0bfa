"""Expert-aware scheduling: batches partition the requests, nobody waits past the fairness bound, similar
routing paths are grouped, and the distinct-expert measures give known answers."""

from __future__ import annotations

import numpy as np
import pytest

from moeflow.scheduler import (
    ExpertAwareScheduler,
    decode_distinct,
    distinct_per_batch,
    expected_distinct,
    fifo,
    usage_path,
)

L, E = 3, 8


def cluster_path(c: int) -> np.ndarray:
    p = np.zeros((L, E))
    p[:, 2 * c : 2 * c + 2] = 1.0
    return p


def check_partition(batches: list[list[int]], n: int, b: int) -> None:
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(n)) and all(1 <= len(x) <= b for x in batches)


@pytest.mark.parametrize("n, b, w", [(50, 4, 2), (37, 8, 1), (9, 16, 3), (64, 16, 0)])
def test_partition_and_fairness_bound_on_random_paths(n: int, b: int, w: int) -> None:
    rng = np.random.default_rng(n)
    paths = [rng.random((L, E)) ** 3 for _ in range(n)]
    batches = ExpertAwareScheduler(b, w).order(paths)
    check_partition(batches, n, b)
    for rnd, batch in enumerate(batches):
        for i in batch:
            assert rnd <= i // b + w  # never more than w rounds later than FIFO


def test_an_outlier_is_not_starved() -> None:
    # Request 1 shares nothing with anyone; everyone else is alike. Greedy alone would leave it to the end.
    paths = [cluster_path(0)] + [cluster_path(3)] + [cluster_path(0)] * 30
    batches = ExpertAwareScheduler(4, 2).order(paths)
    rnd = next(r for r, batch in enumerate(batches) if 1 in batch)
    assert rnd <= 1 // 4 + 2
    late = [cluster_path(0)] * 30 + [cluster_path(3)]  # an outlier arriving last still runs at its FIFO round
    batches = ExpertAwareScheduler(4, 0).order(late)
    assert 30 in batches[30 // 4]


def test_zero_wait_is_fifo() -> None:
    rng = np.random.default_rng(0)
    paths = [rng.random((L, E)) for _ in range(10)]
    assert ExpertAwareScheduler(3, 0).order(paths) == fifo(10, 3)


def test_interleaved_clusters_are_grouped() -> None:
    labels = [0, 1, 2, 3] * 4  # FIFO batches of 4 mix all four clusters
    paths = [cluster_path(c) for c in labels]
    batches = ExpertAwareScheduler(4, 3).order(paths)
    check_partition(batches, 16, 4)
    assert all(len({labels[i] for i in batch}) == 1 for batch in batches)
    ours, base = distinct_per_batch(batches, paths), distinct_per_batch(fifo(16, 4), paths)
    assert ours.shape == (4, L) and (ours == 2).all() and (base == 8).all()


def test_expected_distinct_known_answers() -> None:
    a, b = np.zeros((1, 4)), np.zeros((1, 4))
    a[0, 0], b[0, 0] = 0.5, 0.5
    assert expected_distinct([a, b]).tolist() == [0.75]  # 1 - 0.5 * 0.5
    assert expected_distinct([cluster_path(0), cluster_path(1), cluster_path(0)]).tolist() == [4.0] * L


def test_usage_path_and_decode_distinct() -> None:
    r1 = np.array([[[0, 1]], [[0, 2]]])  # two decode tokens, one layer, top-2
    r2 = np.array([[[1, 3]]])  # one decode token
    assert usage_path(r1, 4).tolist() == [[1.0, 0.5, 0.5, 0.0]]
    total, steps = decode_distinct([r1, r2], 4)
    assert steps == 2 and total.tolist() == [3 + 2]  # step 0: {0,1,3}; step 1: {0,2}


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ExpertAwareScheduler(0)
    with pytest.raises(ValueError):
        ExpertAwareScheduler(4, -1)
    assert ExpertAwareScheduler(4).order([]) == []


def test_admit_prefers_requests_sharing_the_running_batch_experts() -> None:
    from moeflow.scheduler import admit

    running = [cluster_path(1), cluster_path(1)]
    waiting = [cluster_path(0), cluster_path(2), cluster_path(1), cluster_path(3), cluster_path(1)]
    assert admit(running, waiting, [0] * 5, 1, max_wait=5) == [2]  # shares cluster 1, though not the oldest
    assert admit(running, waiting, [0] * 5, 2, max_wait=5) == [2, 4]
    assert admit(running, waiting, [0] * 5, 5, max_wait=5) == [0, 1, 2, 3, 4]  # room for all: all
    assert admit(running, waiting, [0] * 5, 1, max_wait=0) == [0]  # max_wait 0 is FIFO
    assert admit(running, waiting, [0] * 5, 0, max_wait=5) == []


@pytest.mark.parametrize("w", [0, 1, 3, 6])
def test_admit_wait_bound(w: int) -> None:
    """Simulated serving, one row freed per step, new similar requests arriving all the time: a dissimilar request
    is admitted by the step after it has waited ``w`` steps, and no overdue request is passed over for a younger one."""
    from moeflow.scheduler import admit

    rng = np.random.default_rng(w)
    running = [cluster_path(0)] * 3
    queue: list[tuple[int, np.ndarray, int]] = [(0, cluster_path(3), 0)]  # (arrival, path, waited)
    admitted_at: dict[int, int] = {}
    for step in range(40):
        queue += [(100 * (step + 1) + k, cluster_path(0), 0) for k in range(int(rng.integers(1, 3)))]
        chosen = admit(running, [q[1] for q in queue], [q[2] for q in queue], 1, w)
        overdue = [q[0] for q in queue if q[2] >= w]
        for i in chosen:
            if overdue:
                assert queue[i][0] == min(overdue)
            admitted_at[queue[i][0]] = step
        queue = [(a, p, n + 1) for i, (a, p, n) in enumerate(queue) if i not in chosen]
    assert admitted_at[0] <= w
    assert (
        admitted_at[0] == w or w == 0
    )  # it was passed over while it could be, in favour of the similar ones
