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
