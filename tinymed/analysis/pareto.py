"""The non-dominated set for (memory ↓, accuracy ↑).

Point q dominates p when q.memory <= p.memory and q.accuracy >= p.accuracy with at least one strict.
So points equal in both figures never dominate each other: they are on the front together, or off it
together. A point missing either figure (None) is never on the front and dominates nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

Point = tuple[float | None, float | None]  # (memory, accuracy)


def _complete(point: Point) -> bool:
    return point[0] is not None and point[1] is not None


def dominates(q: Point, p: Point) -> bool:
    """True when q is at least as small in memory and as high in accuracy as p, and better in one."""
    if not (_complete(q) and _complete(p)):
        return False
    no_worse = q[0] <= p[0] and q[1] >= p[1]
    return no_worse and (q[0] < p[0] or q[1] > p[1])


def pareto_front(points: Sequence[Point]) -> list[bool]:
    """For each (memory, accuracy) point, whether it is non-dominated (O(n²); n = variants)."""
    return [_complete(p) and not any(dominates(q, p) for q in points) for p in points]


def front_staircase(points: Sequence[Point]) -> list[tuple[float, float]]:
    """The front's points sorted by memory (then accuracy), for drawing it as a step line."""
    on_front = pareto_front(points)
    return sorted({(p[0], p[1]) for p, keep in zip(points, on_front, strict=True) if keep})
