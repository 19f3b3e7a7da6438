"""Our own C kernels, run by tinygrad on its CPU device as part of its graph (captured by TinyJit like any
other kernel).

tinygrad compiles the C with its clang (-O2 -march=native), loads the object code into memory itself and
calls the function with one pointer per buffer, then one int per variable; with several threads it calls
it once per thread with the thread's index as `core_id`. So the C must be self-contained (no libc, no
libm) and split its work by `core_id`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from tinygrad import Device, Tensor, UOp
from tinygrad.renderer import Estimates
from tinygrad.renderer.cstyle import ClangJITRenderer
from tinygrad.uop.ops import KernelInfo, Ops, ProgramInfo

if TYPE_CHECKING:
    from tinygrad.device import Compiler

DeviceName = str | tuple[str, ...] | None  # as tinygrad's Tensor.device

# A kernel launch through tinygrad's CPU queue costs ~10 us here, and handing a share to its second thread (a
# Python queue) costs more, so under tinygrad's replay only big kernels (in multiply-adds) use it; our step
# runner hands a share to a thread of its own that spins for it, so there every product worth it is split
TWO_THREADS_FROM = 4 << 20
TWO_THREADS_FROM_STEP_RUNNER = 100_000


def compiler_for(device: DeviceName) -> Compiler | None:
    """The compiler our kernels need: the CPU device's clang (not its LLVM or x86 back ends, nor a GPU's).
    None where they cannot run; callers then use plain tinygrad ops."""
    if not isinstance(device, str) or device.split(":")[0] != "CPU":
        return None
    renderer = Device[device].renderer
    return renderer.compiler if isinstance(renderer, ClangJITRenderer) else None


def kernel_source(file: str) -> str:
    """A C source from kernels/, shipped as package data."""
    return (resources.files("tinygrad_backend") / "kernels" / file).read_text(encoding="utf-8")


def kernel_text(file: str, name: str, defines: dict[str, object]) -> str:
    """The C of kernel `name`: its constants as macros (so clang unrolls and vectorizes for each shape), the
    shared helpers, then kernels/`file` with NAME replaced by the kernel's name."""
    return "".join(f"#define {k} {v}\n" for k, v in defines.items()) + C_HELPERS + kernel_source(file).replace("NAME", name)


@dataclass(frozen=True)
class Kernel:
    name: str
    source: str
    binary: bytes
    threads: int


@functools.cache
def compile_kernel(compiler: Compiler, name: str, source: str, threads: int) -> Kernel:
    return Kernel(name, source, compiler.compile_cached(source), threads)


def run(kernel: Kernel, out: Tensor, inputs: list[Tensor], estimates: Estimates, written: tuple[int, ...] = ()) -> Tensor:
    """out after the kernel ran on (out, *inputs): the C function's pointer arguments, in that order.
    `written`: indexes into inputs that the kernel also writes (a KV cache)."""
    threads = kernel.threads

    def program(*buffers: UOp) -> UOp:
        core = UOp.variable("core_id", 0, threads - 1)
        sink = UOp.sink(*buffers, core, arg=KernelInfo(name=kernel.name, estimates=estimates))
        outs = (0, *(i + 1 for i in written))
        info = ProgramInfo(name=kernel.name, global_size=(threads, 1, 1), local_size=None, vars=(core,),
                           globals=tuple(range(len(buffers))), outs=outs,
                           ins=tuple(i for i in range(1, len(buffers)) if i not in outs))
        return UOp(Ops.PROGRAM, src=(sink, UOp(Ops.DEVICE, arg=out.device), UOp(Ops.LINEAR, src=(*sink.src, sink)),
                                     UOp(Ops.SOURCE, arg=kernel.source), UOp(Ops.BINARY, arg=kernel.binary)), arg=info)

    # as Tensor.custom_kernel, but without its .contiguous() on every input: inside a tinygrad function
    # that copies the block's input (a parameter) in a kernel of its own, several times a block
    srcs = (out.uop, *(_as_buffer(t.uop) for t in inputs))
    call = program(*(UOp.placeholder_like(s, slot=i) for i, s in enumerate(srcs))).call(*srcs)
    return Tensor(out.uop.after(call))


def _as_buffer(u: UOp) -> UOp:
    """u itself where it already is a whole buffer (or a reshape of one), else a copy into one."""
    base = u
    while base.op is Ops.RESHAPE:
        base = base.src[0]
    # GETTUPLE: the output of a tinygrad function (the previous block's)
    return u if base.op in (Ops.PARAM, Ops.BUFFER, Ops.AFTER, Ops.GETTUPLE, Ops.CONTIGUOUS) else u.contiguous()


# helpers our C sources share, before each kernel's own source
C_HELPERS = kernel_source("helpers.h")
