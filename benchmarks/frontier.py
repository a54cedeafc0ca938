"""Speed against quality as frontiers: which settings of a decoder are worth having, and how fast each decoder is at a
given quality.

- `pareto`: the settings no other setting beats on both axes (lower genPPL and higher tokens/s);
- `speed_at`: a frontier's tokens/s at a genPPL, interpolated linearly in log-log space between its points; None
  below its best quality (it cannot reach that quality), its top speed above its worst;
- `speed_ratio`: one frontier's speed over another's at the same quality.
"""

from __future__ import annotations

import math


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated (gen_ppl, tokens_per_sec) points, by increasing genPPL (and so increasing speed)."""
    front: list[tuple[float, float]] = []
    for ppl, speed in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or speed > front[-1][1]:
            front.append((ppl, speed))
    return front


def speed_at(frontier: list[tuple[float, float]], ppl: float) -> float | None:
    """tokens/s of a Pareto frontier at genPPL `ppl` (log-log interpolation); None if it never gets that good."""
    if not frontier or ppl < frontier[0][0]:
        return None
    if ppl >= frontier[-1][0]:
        return frontier[-1][1]
    for (p0, s0), (p1, s1) in zip(frontier, frontier[1:]):
        if p0 <= ppl <= p1:
            w = (math.log(ppl) - math.log(p0)) / (math.log(p1) - math.log(p0))
            return math.exp(math.log(s0) + w * (math.log(s1) - math.log(s0)))
    return None  # unreachable: the frontier is sorted


def speed_ratio(frontier: list[tuple[float, float]], baseline: list[tuple[float, float]], ppl: float) -> float | None:
    """frontier's speed over baseline's at genPPL ppl; None where either cannot reach it."""
    mine, theirs = speed_at(frontier, ppl), speed_at(baseline, ppl)
    return None if mine is None or theirs is None else mine / theirs
