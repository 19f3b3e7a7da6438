"""What a benchmark needs to tell the host's speed from the code's: a fixed pure-Python workload, and the time
the CPU kernels actually run, whether our step runner or tinygrad's CPU queue runs them (so a decode step's
wall time splits into kernels and host work)."""

from __future__ import annotations

import time


def python_loop_ms() -> float:
    """A fixed pure-Python workload (best of 5): the host's Python speed, which these hosts differ in 3x."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i % 7
        best = min(best, time.perf_counter() - start)
    return best * 1000


class KernelClock:
    """Time during which at least one CPU kernel runs (the CPU device only): a decode step's wall time minus
    this is the host's share of it. Kernels our step runner replays (tinygrad_backend/step_runner.py, the
    default) are timed by the runner itself in C, each from its start to its last thread's end; any that
    tinygrad's CPU queue runs (a JIT's first calls, DELEGATE_STEP_RUNNER=0) from the queue's own calls.
    Installed before the model is built (a captured JIT keeps the queue's method it captured), and timing only
    while `on`."""

    def __init__(self) -> None:
        import threading

        from tinygrad.runtime import ops_cpu

        from tinygrad_backend import step_runner

        self.spans: list[tuple[float, float]] = []
        self._runner = step_runner.TIMING
        self._on = False
        lock = threading.Lock()
        run = ops_cpu.CPUComputeQueue._exec

        def timed(queue, tid, prg, bufs, *args):  # type: ignore[no-untyped-def]
            if not self.on:
                return run(queue, tid, prg, bufs, *args)
            start = time.perf_counter()
            run(queue, tid, prg, bufs, *args)
            end = time.perf_counter()
            with lock:
                self.spans.append((start, end))

        ops_cpu.CPUComputeQueue._exec = timed  # type: ignore[method-assign]

    @property
    def on(self) -> bool:
        return self._on

    @on.setter
    def on(self, value: bool) -> None:
        self._on = self._runner.on = value

    def busy(self) -> float:
        """Seconds of kernels since the last call: the step runner's, plus the union of tinygrad's queue's
        spans (its threads overlap). The two never overlap: the runner waits for tinygrad's queue first."""
        spans, self.spans = sorted(self.spans), []
        total, end = self._runner.take(), float("-inf")
        for s, e in spans:
            total += max(0.0, e - max(s, end))
            end = max(end, e)
        return total
