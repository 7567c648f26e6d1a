"""Closed tours over stage groups (DT-FM arXiv 2206.01288 section 3: the pipeline order).

Held-Karp is exact but O(S^2 2^S): used up to ``HELD_KARP_MAX`` stages; above that a nearest
neighbour tour improved by 2-opt.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

HELD_KARP_MAX = 12


def tour_cost(dist: np.ndarray, tour: List[int]) -> float:
    return float(sum(dist[tour[i], tour[(i + 1) % len(tour)]] for i in range(len(tour))))


_LAYERS: dict = {}


def _layers(m: int):
    """For subsets of m cities by size (2..m) and each end city k: the masks holding k, without k."""
    if m not in _LAYERS:
        masks = np.arange(1 << m)
        popcount = np.array([bin(x).count("1") for x in range(1 << m)])
        out = []
        for size in range(2, m + 1):
            layer = masks[popcount == size]
            for k in range(m):
                with_k = layer[(layer & (1 << k)) != 0]
                out.append((k, with_k, with_k ^ (1 << k), np.arange(len(with_k))))
        _LAYERS[m] = out
    return _LAYERS[m]


def held_karp(dist: np.ndarray) -> Tuple[float, List[int]]:
    """Exact shortest closed tour from city 0; the DP runs layer by layer (subset size), in numpy."""
    dist = np.asarray(dist, dtype=np.float64)
    n = len(dist)
    if n <= 2:
        return tour_cost(dist, list(range(n))), list(range(n))
    m = n - 1  # cities 1..n-1 as bits 0..m-1
    full = 1 << m
    best = np.full((full, m), np.inf)
    parent = np.full((full, m), -1, dtype=np.int64)
    sub = dist[1:, 1:]
    for j in range(m):
        best[1 << j, j] = dist[0, j + 1]
    for k, with_k, without_k, rows in _layers(m):
        cand = best[without_k] + sub[:, k][None, :]  # (masks, j): end at j, then go to k
        j = np.argmin(cand, axis=1)
        best[with_k, k] = cand[rows, j]
        parent[with_k, k] = j
    last = best[full - 1] + dist[1:, 0]
    end = int(np.argmin(last))
    tour, mask = [], full - 1
    while end >= 0:
        tour.append(end + 1)
        prev = int(parent[mask, end])
        mask ^= 1 << end
        end = prev
    return float(last.min()), [0] + tour[::-1]


def two_opt(dist: np.ndarray) -> Tuple[float, List[int]]:
    """Nearest-neighbour tour from 0, then 2-opt until no improving move."""
    n = len(dist)
    tour, left = [0], set(range(1, n))
    while left:
        nxt = min(left, key=lambda c: dist[tour[-1], c])
        tour.append(nxt)
        left.remove(nxt)
    improved = True
    while improved:
        improved = False
        for i in range(1, n - 1):
            for j in range(i + 1, n):
                a, b = tour[i - 1], tour[i]
                c, d = tour[j], tour[(j + 1) % n]
                if dist[a, c] + dist[b, d] < dist[a, b] + dist[c, d] - 1e-12:
                    tour[i:j + 1] = tour[i:j + 1][::-1]
                    improved = True
    return tour_cost(dist, tour), tour


def best_tour(dist: np.ndarray, exact_max: int = HELD_KARP_MAX) -> Tuple[float, List[int]]:
    return held_karp(dist) if len(dist) <= exact_max else two_opt(dist)
