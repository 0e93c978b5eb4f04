"""Where a batch runs: on the event loop itself or on one of the model's instance threads."""

from __future__ import annotations

# Calls this cheap (moving average) run on the event loop instead of an instance thread: a
# thread hand-off and the wake-up back cost more than the model.
INLINE_MAX_S = 250e-6
# At most this many inline batches run back to back before other work on the loop gets its turn.
INLINE_BURST = 8


def runs_inline(cpu_s: float, rows_measured: float, rows: int) -> bool:
    """Whether a batch of ``rows`` runs on the event loop, from the model's moving averages of
    the *model call's* CPU time and of rows per call. Only the model call can run beside the
    loop on an instance thread: joining inputs and splitting outputs are Python and hold the
    interpreter lock wherever they run, and handing the batch to a thread and back costs more
    than a cheap call (two wake-ups and lock hand-offs). CPU time of the calling thread decides:
    preemption on a busy machine does not count, and neither does waiting for the lock after the
    call, which a wall clock would add on a thread while the loop is busy. (Calls that wait on a
    device are kept off the loop by the model itself: ``inline_safe`` is false for them.) A batch
    larger than the measured ones is predicted to cost proportionally more (an upper bound: a
    call's fixed cost does not grow with its rows), so a big batch of a model that is only cheap
    for small ones still goes to an instance thread."""
    scale = max(1.0, rows / max(1.0, rows_measured))
    return cpu_s * scale < INLINE_MAX_S


__all__ = ["INLINE_BURST", "INLINE_MAX_S", "runs_inline"]
