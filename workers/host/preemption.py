"""Preemption: which running row gives its place to an interactive request.

An interactive request (the page, /v1/synthesize, /v1/audio/speech) that waits
while every place of the engine is held may take the place of a batch row (a
job). The batch row's KV is freed at once; its history already went to the
parent with its audio, so it resumes later, on any worker, from its last step
(workers/engines/vibevoice/resume.py). StepHost.schedule asks `victim` (its
`preempt` policy) when a request cannot join; this module decides nothing else.

    victim(waiting, running) -> Row | None

The policy, over a snapshot of the running rows:
  - only batch rows are taken, and only for an interactive request;
  - a row is not taken again before it has made MIN_PROGRESS_STEPS steps since it
    (re)joined, so a job always moves on and always finishes, nor before it has made
    1/RESUME_SHARE of the steps it holds: a resume recomputes the row's whole history
    in one prefill, so a long job preempted every few steps would spend the GPU on
    prefills that grow with it (quadratic in its length); with the share, the
    prefilled tokens stay under RESUME_SHARE per step the row makes (linear);
  - among those, the row with the most audio left to make (it would hold its
    place longest); ties go to the row that joined last.
"""

from __future__ import annotations

from collections.abc import Sequence

from workers.engines.row import Row
from workers.wire.messages import Priority, Request

MIN_PROGRESS_STEPS = 8  # steps a row makes between two preemptions (~1 s of audio)
RESUME_SHARE = 32  # and at least 1/32 of its steps: 10 min of audio, 140 steps (19 s)


def settled(row: Row) -> bool:
    """Whether `row` has moved on enough since it (re)joined to be taken again."""
    made = row.steps - row.joined_at
    return made >= max(MIN_PROGRESS_STEPS, row.steps // RESUME_SHARE)


def victim(waiting: Request, running: Sequence[Row]) -> Row | None:
    """The row that gives its place to `waiting`, or None (a row's `joined_at`: its
    step count when it joined this engine)."""
    if waiting.priority != Priority.INTERACTIVE.value:
        return None
    candidates = [
        (row.budget_tokens - row.audio_tokens, k, row)
        for k, row in enumerate(running)
        if row.request.priority == Priority.BATCH.value
        and not row.closed
        and row.trail is not None
        and settled(row)
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda c: (c[0], c[1]))[2]
