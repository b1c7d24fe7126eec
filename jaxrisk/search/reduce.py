"""From lanes back to answers: group the restarts of one search target and keep the best."""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, Sequence


def lane_groups(keys: Iterable[Hashable]) -> dict[Any, list[int]]:
    """Lane indices by search target (class, pair, behaviour, penalty), targets in order of first lane."""
    groups: dict[Any, list[int]] = {}
    for lane, key in enumerate(keys):
        groups.setdefault(key, []).append(lane)
    return groups


def best_per_group(groups: Iterable[Sequence[int]], rank: Callable[[int], Any]) -> list[int]:
    """The lane with the smallest `rank(lane)` in each group (ties: the earliest lane)."""
    return [min(lanes, key=rank) for lanes in groups]


def pareto_set(items: Sequence[Any], costs: Callable[[Any], Sequence[float]]) -> list[int]:
    """Indices of the items no other item dominates (no higher cost anywhere, lower somewhere), each cost to be
    minimised; of items with equal costs only the first is kept. In order of the costs (first cost first)."""
    values = [tuple(costs(x)) for x in items]
    keep = []
    for i, a in enumerate(values):
        dominated = any(all(b_ <= a_ for a_, b_ in zip(a, b)) and (b != a or j < i)
                        for j, b in enumerate(values) if j != i)
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: values[i])
