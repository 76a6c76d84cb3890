"""What each rank did and when during pipeline steps: one event per action (stage, F/B/W, micro-batch, start,
end), the measured bubble fraction and the theory ``(p - 1) / (m + p - 1)``. Torch only."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    """One action of one rank: ``kind`` is ``F`` (forward), ``B`` (backward, or its input half in zero-bubble
    schedules) or ``W`` (the deferred weight-gradient half); times in seconds of ``time.perf_counter``, which is
    shared by the processes of one machine."""

    rank: int
    stage: int
    kind: str
    microbatch: int
    start: float
    end: float
    step: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TimelineRecorder:
    """Wraps the compute methods of ``PipelineStage`` objects and appends an :class:`Event` per call while
    ``step`` is not None."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.events: list[Event] = []
        self.step: int | None = None

    def watch(self, stage: Any) -> None:
        """Record ``stage``'s forward, backward and weight-gradient calls."""
        index = stage.stage_index
        for method, kind in (
            ("forward_one_chunk", "F"),
            ("backward_one_chunk", "B"),
            ("backward_weight_one_chunk", "W"),
        ):
            setattr(stage, method, self._wrap(getattr(stage, method), index, kind))

    def _wrap(self, fn: Any, stage: int, kind: str) -> Any:
        @functools.wraps(fn)
        def timed(chunk: int, *args: Any, **kwargs: Any) -> Any:
            if self.step is None:
                return fn(chunk, *args, **kwargs)
            start = time.perf_counter()
            out = fn(chunk, *args, **kwargs)
            self.events.append(Event(self.rank, stage, kind, chunk, start, time.perf_counter(), self.step))
            return out

        return timed


def bubble_theory(pp: int, n_microbatches: int) -> float:
    """Idle fraction of GPipe/1F1B with equal stages: ``(p - 1) / (m + p - 1)``.

    Example::

        >>> bubble_theory(2, 4)
        0.2
    """
    return (pp - 1) / (n_microbatches + pp - 1)


def bubble_fraction(events: Iterable[Event], ranks: Sequence[int] | None = None) -> float:
    """Measured idle fraction: per step, ``1 - busy / (ranks · (last end - first start))``, averaged over steps.

    Example::

        >>> e = [Event(0, 0, "F", 0, 0.0, 1.0), Event(1, 1, "F", 0, 1.0, 2.0)]
        >>> bubble_fraction(e)
        0.5
    """
    by_step: dict[int, list[Event]] = {}
    for event in events:
        by_step.setdefault(event.step, []).append(event)
    fractions = []
    for step_events in by_step.values():
        n = len(ranks) if ranks is not None else len({e.rank for e in step_events})
        window = max(e.end for e in step_events) - min(e.start for e in step_events)
        busy = sum(e.end - e.start for e in step_events)
        fractions.append(1.0 - busy / (n * window) if window > 0 else 0.0)
    return sum(fractions) / len(fractions) if fractions else 0.0
