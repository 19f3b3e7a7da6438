"""Replaying a captured TinyJit on the CPU with one C call: our graph runner in place of tinygrad's CPU queue.

tinygrad 0.13.0 replays a captured JIT on its CPU device through HCQGraph: each replay submits a queue of
commands that its CPU worker thread runs from Python, one ctypes call and a queue hand-off per kernel
(~10 us each, ~185 kernels a decode step), plus the JIT's own input checks and binding. That was 1.7 ms of a
7.5 ms decode step, and it tracks the host's Python speed (BENCHMARKS.md).

Once a JIT has captured, `Plan.build` turns what it captured into a plan: for each kernel the address of its
code (CPUProgram's mapped memory), its arguments (the buffers' addresses, then its int variables), how many
threads share it and which argument is its `core_id`. kernels/step_runner.c (a shared library compiled once
with tinygrad's own C compiler) runs the whole plan in one call on the calling thread; kernels split over
threads run their other shares on a small pool of threads of its own. Values that change per call (a
variable a kernel takes, such as a prompt chunk's last real token) are patched in by that call.

A plan is only built where replaying it this way is the same as tinygrad's replay, else the JIT keeps
tinygrad's (and `Replay.fallback` says why): every captured item is a compiled kernel of the CPU device's C
renderer (no copies, views or other custom functions), launch sizes are fixed, every buffer is fixed (the
JIT's inputs are buffers made once and written in place, model.py's InputBuffer: checked against what the
JIT captured), and the variables are ones the caller passes. Before a plan runs, tinygrad's CPU queue is
synchronized, so nothing tinygrad queued still reads or writes; the call returns when every kernel is done,
so whatever tinygrad does next (reading the logits) sees the results.

DELEGATE_STEP_RUNNER=0 in the environment keeps tinygrad's own replay (the escape hatch); other devices
always keep it (a GPU's HCQGraph already submits the whole graph at once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tinygrad import Device, GlobalCounters, Tensor, TinyJit, dtypes
from tinygrad.device import Buffer
from tinygrad.engine.realize import estimate_uop, get_graph_runtime, get_runtime, resolve_params
from tinygrad.helpers import cache_dir, getenv
from tinygrad.renderer import Estimates
from tinygrad.uop.ops import Ops, ProgramInfo, UOp, sint, sym_infer

from tinygrad_backend.cpu_kernel import compiler_for, kernel_source

ENV = "DELEGATE_STEP_RUNNER"
MAX_ARGS, MAX_THREADS = 16, 65  # as kernels/step_runner.c (the calling thread and 64 of its own)
SPIN_NS = 50_000  # how long a pool thread spins for its next share (and the caller for its end) before it sleeps

# kernels/step_runner.c's sr_kernel and sr_patch, field for field
KERNEL = np.dtype([("fn", np.uint64), ("nargs", np.int32), ("threads", np.int32), ("core_arg", np.int32),
                   ("unused", np.int32), ("args", np.uint64, (MAX_ARGS,))])
PATCH = np.dtype([("kernel", np.int32), ("arg", np.int32), ("var", np.int32), ("unused", np.int32)])


def enabled() -> bool:
    """Whether the environment leaves our runner on (the default)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def register_arguments() -> int | None:
    """How many arguments a kernel may take to be called as 64-bit integers (see step_runner.c), or None where
    we do not call kernels ourselves. x86-64 SysV and Linux's AArch64 widen every argument to an 8-byte register
    or stack slot; Apple's AArch64 packs stack arguments by size, so there only the 8 register arguments;
    Windows' kernels use its own convention (ms_abi)."""
    machine = platform.machine().lower()
    if sys.platform == "win32":
        return None
    if machine in ("x86_64", "amd64"):
        return MAX_ARGS
    if machine in ("arm64", "aarch64"):
        return 8 if sys.platform == "darwin" else MAX_ARGS
    return None


class KernelTime:
    """Time spent in our runner's kernels, when `on` (bench/host_timing.py's KernelClock turns it on): each
    kernel from its start to the end of its last share, so a step's wall time minus this is the host's."""

    def __init__(self) -> None:
        self.on = False
        self.seconds = 0.0

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


TIMING = KernelTime()


@functools.cache
def library() -> ctypes.CDLL | str:
    """kernels/step_runner.c as a shared library, compiled once per source and compiler into tinygrad's cache
    directory; a string saying why not where it cannot be."""
    source = kernel_source("step_runner.c")
    cc = getenv("CC", "clang")  # tinygrad's CPU compiler (runtime/support/compiler_cpu.py)
    key = hashlib.sha256(f"{cc}\0{platform.machine()}\0{sys.platform}\0{source}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"delegate_step_runner_{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so")
            os.close(fd)
            try:
                subprocess.run([cc, "-O2", "-fPIC", "-shared", "-pthread", "-x", "c", "-", "-o", tmp],
                               input=source.encode(), check=True, capture_output=True, timeout=120)
                os.replace(tmp, path)  # whole, or not at all: another process may be compiling it too
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(path))  # ctypes lets go of the GIL for the call: other threads run during a step
    except (OSError, subprocess.SubprocessError) as e:
        return f"the step runner could not be built ({e})"
    lib.sr_run.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p]
    lib.sr_run.restype = ctypes.c_int
    lib.sr_set_spin.argtypes = [ctypes.c_int64]
    lib.sr_set_spin.restype = None
    lib.sr_set_spin(SPIN_NS)
    return lib


class Unsupported(Exception):
    """What the JIT captured cannot be replayed by our runner exactly as tinygrad would: keep tinygrad's."""


@dataclass
class Plan:
    kernels: np.ndarray  # KERNEL
    patches: np.ndarray  # PATCH
    variables: tuple[tuple[str, int, int], ...]  # per-call values: name, lowest, highest
    output: Any  # what the JIT returns (its output buffers are fixed)
    device: str
    names: list[str]  # each kernel's name, for timings
    counted: tuple[int, sint, sint]  # what tinygrad's replay adds to GlobalCounters a call: calls, ops, bytes
    keep: list[Any] = field(repr=False)  # the buffers and programs the plan's addresses point into, kept alive
    _lib: ctypes.CDLL = field(repr=False)
    _vars: np.ndarray = field(init=False, repr=False)
    _ns: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._vars = np.zeros(max(1, len(self.variables)), dtype=np.int64)
        self._ns = np.zeros(len(self.kernels) + 1, dtype=np.int64)
        self._args = (self.kernels.ctypes.data, len(self.kernels), self.patches.ctypes.data, len(self.patches),
                      self._vars.ctypes.data)

    @staticmethod
    def build(jit: TinyJit, inputs: Sequence[Tensor], variables: Sequence[str] = ()) -> Plan:
        """The plan of a JIT that has captured, called with `inputs` (its Tensor arguments, in order, the same
        buffers on every call) and per-call `variables`. Raises Unsupported where our runner would not run it
        as tinygrad does."""
        if any(compiler_for(t.device) is None for t in inputs):  # before compiling anything: a GPU keeps HCQGraph
            raise Unsupported("not the CPU device with its C renderer: tinygrad's own graph replays it")
        most_args = register_arguments()
        if most_args is None:
            raise Unsupported(f"kernels are not called as 64-bit integers on {platform.machine()} {sys.platform}")
        lib = library()
        if isinstance(lib, str):
            raise Unsupported(lib)
        captured = jit.captured
        if captured is None:
            raise Unsupported("the JIT has not captured yet")
        input_uops = tuple(t.uop.base for t in inputs)
        if any(u.op is not Ops.BUFFER for u in input_uops) or len(input_uops) != len(captured.expected_input_info):
            raise Unsupported("the inputs given are not the JIT's, one plain buffer each")
        input_buffers = [u.buffer for u in input_uops]
        calls: list[tuple[UOp, list[Buffer]]] = []  # (PROGRAM, its buffers) in order
        for item in captured.linear.src:
            ast = item.src[0]
            if ast.op is Ops.CUSTOM_FUNCTION and ast.arg == "graph":
                graph = get_graph_runtime(ast)
                if graph is None:
                    raise Unsupported("the JIT's graph has not run yet")
                for (dev_index, program, bufs, device_vars), replace in zip(graph.calls, graph.uop_replace, strict=True):
                    if program.op is not Ops.PROGRAM or device_vars or dev_index:
                        raise Unsupported(f"a captured {program.op} is not a plain kernel")
                    for position, index in replace:  # the graph's inputs: these must be our fixed buffers
                        if bufs[position] is not input_buffers[index]:
                            raise Unsupported("an input buffer is not the one the JIT captured")
                    calls.append((program, list(bufs)))
            elif ast.op is Ops.PROGRAM:  # a kernel tinygrad did not put in a graph: its inputs resolved as it does
                bufs = [u.buffer for u in resolve_params(item, input_uops)]
                if any(not isinstance(b, Buffer) for b in bufs):
                    raise Unsupported("a kernel runs on several devices")
                calls.append((ast, bufs))
            else:
                raise Unsupported(f"the JIT captured a {ast.op} {ast.arg if ast.op is Ops.CUSTOM_FUNCTION else ''}")

        kernels = np.zeros(len(calls), dtype=KERNEL)
        patches: list[tuple[int, int, int]] = []
        wanted = {name: i for i, name in enumerate(variables)}
        bounds: dict[str, tuple[int, int]] = {}
        device = None
        names = []
        keep: list[Any] = [b for _, bufs in calls for b in bufs]
        for k, (program, bufs) in enumerate(calls):
            info: ProgramInfo = program.arg
            if device is None:
                device = bufs[0].device
            if any(b.device != device for b in bufs):
                raise Unsupported("the kernels run on more than one device")
            if compiler_for(device) is None:
                raise Unsupported(f"{device} does not run the CPU device's C kernels")
            if tuple(info.globals) != tuple(range(len(bufs))):
                raise Unsupported(f"kernel {info.name} does not take all of its call's buffers in order")
            if any(bufs[o] is b for o in info.outs for b in input_buffers):
                raise Unsupported(f"kernel {info.name} writes an input (tinygrad copies such inputs on every call)")
            threads = (info.global_size or (1,))[0]
            if not isinstance(threads, int) or any(not isinstance(d, int) for d in info.global_size or ()):
                raise Unsupported(f"kernel {info.name} has a launch size that varies")
            runtime = get_runtime(device, program)  # the CPUProgram tinygrad loaded: its code, mapped executable
            keep.append(runtime)
            fn = ctypes.cast(runtime.fxn, ctypes.c_void_p).value
            nargs = len(bufs) + len(info.vars)
            if not fn or nargs > most_args:
                raise Unsupported(f"kernel {info.name} takes {nargs} arguments (at most {most_args} here)")
            core = info.runtimevars.get("core_id")
            if threads > 1 and core is None:
                raise Unsupported(f"kernel {info.name} runs on {threads} threads without a core_id")
            if not 1 <= threads <= MAX_THREADS:
                raise Unsupported(f"kernel {info.name} wants {threads} threads")
            row = kernels[k]
            row["fn"], row["nargs"], row["threads"] = fn, nargs, threads
            row["core_arg"] = -1 if core is None else len(bufs) + core
            for i, b in enumerate(bufs):
                row["args"][i] = b.ensure_allocated()._buf.va_addr
            for i, v in enumerate(info.vars):
                name, low, high = v.arg
                if not dtypes.is_int(v.dtype):
                    raise Unsupported(f"kernel {info.name} takes a {v.dtype} variable {name}")
                if name == "core_id":
                    continue  # 0 here: the calling thread's share; the pool's get theirs in C
                if name not in wanted:
                    raise Unsupported(f"kernel {info.name} takes a variable the caller does not give: {name}")
                bounds[name] = (int(low), int(high))
                patches.append((k, len(bufs) + i, wanted[name]))
            names.append(info.function_name)
        if device is None:
            raise Unsupported("the JIT captured no kernels")
        # tinygrad's replay counts each captured item's estimates in GlobalCounters (bench-backend's bytes read per
        # token reads them); so do we, from the same estimates
        estimates = sum((estimate_uop(item) for item in captured.linear.src), Estimates()).simplify()
        for e in (estimates.ops, estimates.mem):
            if isinstance(e, UOp) and not {v.expr for v in e.variables()} <= set(variables):
                raise Unsupported("its cost estimates take a variable the caller does not give")
        counted = (len(captured.linear.src), estimates.ops, estimates.mem)
        patch = np.zeros(len(patches), dtype=PATCH)
        for i, (kernel, arg, var) in enumerate(patches):
            patch[i]["kernel"], patch[i]["arg"], patch[i]["var"] = kernel, arg, var
        vars_ = tuple((name, *bounds.get(name, (-(1 << 31), (1 << 31) - 1))) for name in variables)
        return Plan(kernels, patch, vars_, captured.ret, device, names, counted, keep, lib)

    def __call__(self, **values: int) -> Any:
        """Run every kernel once, `values` for the plan's variables; what the JIT returns (its output, ready to
        read)."""
        for i, (name, low, high) in enumerate(self.variables):
            value = values[name]
            if not low <= value <= high:
                raise ValueError(f"{name}={value} is outside [{low}, {high}]")
            self._vars[i] = value
        Device[self.device].synchronize()  # tinygrad's queue is idle: nothing it queued touches our buffers
        timed = TIMING.on
        if timed:
            self._ns[:] = 0
        if self._lib.sr_run(*self._args, self._ns.ctypes.data if timed else None) != 0:
            raise RuntimeError("the step runner could not start its threads")
        if timed:
            TIMING.seconds += int(self._ns[-1]) / 1e9
        calls, ops, mem = self.counted
        GlobalCounters.kernel_count += calls
        GlobalCounters.global_ops += sym_infer(ops, values)
        GlobalCounters.global_mem += sym_infer(mem, values)
        return self.output

    def kernel_times(self) -> list[tuple[str, float]]:
        """Each kernel's time in the last timed call, seconds (while TIMING.on)."""
        return [(n, int(t) / 1e9) for n, t in zip(self.names, self._ns[:-1], strict=True)]


class Replay:
    """Calls a TinyJit; once it has captured, on the CPU, replays it through our runner instead (Plan), while
    `use` is true. The JIT's Tensor inputs must be the same buffers on every call, given here once, written in
    place before each call."""

    def __init__(self, jit: TinyJit, inputs: Sequence[Tensor], variables: Sequence[str] = (), use: bool = True) -> None:
        self.jit, self.inputs, self.variables = jit, tuple(inputs), tuple(variables)
        self.use = use
        self.plan: Plan | None = None
        self.fallback: str | None = None  # why the JIT keeps tinygrad's replay, once a plan was tried

    def __call__(self, call: Callable[[], Any], **values: int) -> Any:
        """What the JIT returns for this call: `call()` calls the JIT itself (the first calls, which run and
        capture it, and tinygrad's replay); once it has captured, our plan runs with `values` instead."""
        if self.use:
            plan = self.plan if self.plan is not None or self.fallback is not None else self.prepare()
            if plan is not None:
                return plan(**values)
        return call()

    def prepare(self) -> Plan | None:
        """The plan, built once the JIT has captured (None before that, or where it keeps tinygrad's replay)."""
        if self.plan is None and self.fallback is None and self.jit.captured is not None and self.jit.cnt >= 2:
            try:
                self.plan = Plan.build(self.jit, self.inputs, self.variables)
            except Unsupported as e:
                self.fallback = str(e)
        return self.plan

    def status(self) -> str:
        """Who replays the JIT, for the start-up log."""
        if self.jit.captured is None:
            return "not captured yet"
        if not self.use:
            return f"tinygrad ({ENV}=0)"
        plan = self.prepare()
        return f"step runner ({len(plan.kernels)} kernels)" if plan is not None else f"tinygrad ({self.fallback})"
