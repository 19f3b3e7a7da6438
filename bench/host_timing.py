"""What a benchmark needs to tell the host's speed from the code's: a fixed pure-Python workload, and the time
tinygrad's CPU kernels actually run (so a decode step's wall time splits into kernels and host work)."""

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
    """Time during which at least one of tinygrad's CPU kernels runs, from its CPU queue's own calls (the CPU
    device only): a decode step's wall time minus this is the host's share of it. Installed before the model
    is built (a captured JIT keeps the queue's method it captured), and timing only while `on`."""

    def __init__(self) -> None:
        import threading

        from tinygrad.runtime import ops_cpu

        self.spans: list[tuple[float, float]] = []
        self.on = False
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

    def busy(self) -> float:
        """Seconds covered by the spans recorded since the last call (their union: threads overlap)."""
        spans, self.spans = sorted(self.spans), []
        total, end = 0.0, float("-inf")
        for s, e in spans:
            total += max(0.0, e - max(s, end))
            end = max(end, e)
        return total
