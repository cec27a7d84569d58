"""Latency relative to a reference network timed in the same rounds, for CPUs other jobs share.

On a shared CPU a forward's wall time follows the load of the moment: the same 845K-parameter U-Net
timed 9.9, 33.5, 406.9 and 2,420 ms in four studies (issue #32). Load that comes and goes hits two
networks timed in alternation alike, so their ratio holds where their times do not: `measure_pair`
alternates candidate and reference forward by forward (ABBA order: candidate first in even rounds,
reference first in odd ones, so neither always runs on caches the other warmed) and reports the
ratio of medians and the median of the per-round ratios. The latency tables (nas/cost/table.py)
interleave their rounds for the same reason.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch

from nas.cost import measure
from nas.cost.measure import Forward, Latency


@dataclass
class PairLatency:
    candidate: Latency  # the candidate's own times (as measured, load included)
    reference: Latency  # the reference network's times in the same rounds
    ratio: float  # candidate median / reference median
    ratio_rounds: float  # median over rounds of candidate / reference within the round
    ratio_rounds_p90: float  # 90th percentile of the per-round ratios
    other_cores_busy: float  # CPU cores other processes kept busy while timing (CPU only)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "ratio_rounds": self.ratio_rounds,
            "ratio_rounds_p90": self.ratio_rounds_p90,
            "other_cores_busy": self.other_cores_busy,
            "candidate": self.candidate.as_dict(),
            "reference": self.reference.as_dict(),
        }


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]  # as Latency's p90


def measure_pair(candidate: Forward, reference: Forward, warmup: int, rounds: int) -> PairLatency:
    """`warmup` untimed forwards of each, then `rounds` rounds of one timed forward of each, in
    alternating order. Both must run on the same device."""
    if candidate.device != reference.device:
        raise ValueError(
            f"candidate on {candidate.device}, reference on {reference.device}: time both on one"
        )
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if candidate.cuda:
        torch.cuda.reset_peak_memory_stats(candidate.device)
    cand: list[float] = []
    ref: list[float] = []
    with measure.OtherLoad() as load:
        for _ in range(warmup):
            candidate()
            reference()
        for i in range(rounds):
            if i % 2 == 0:
                cand.append(candidate.time_ms())
                ref.append(reference.time_ms())
            else:
                ref.append(reference.time_ms())
                cand.append(candidate.time_ms())
    ratios = [c / r for c, r in zip(cand, ref)]
    cand_latency, ref_latency = candidate.latency(cand, load.cores), reference.latency(ref, load.cores)
    return PairLatency(
        candidate=cand_latency,
        reference=ref_latency,
        ratio=cand_latency.latency_ms_p50 / ref_latency.latency_ms_p50,
        ratio_rounds=statistics.median(ratios),
        ratio_rounds_p90=_p90(ratios),
        other_cores_busy=cand_latency.other_cores_busy,
    )
