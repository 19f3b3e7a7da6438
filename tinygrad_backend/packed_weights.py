"""Weights kept packed in blocks, and the CPU kernel that multiplies by them (`--weights packed`).

A decode step reads every weight once, so on a CPU its speed is the bytes read per token: fp32 weights
are 4 bytes each. Packed, a block of 32 weights is 32 4-bit or 8-bit steps plus an fp32 scale and offset,
w = scale * q + offset:

- 4-bit blocks are the GGUF file's own (Q4_0, Q4_1), taken into this layout exactly: 0.75 bytes a weight;
- anything else (Q8_0, K-quants, f16) is requantized from the loaded fp32 weights to 8 bits with the
  block's min and max: 1.25 bytes a weight, within half a step of 1/255 of the block's range.

tinygrad 0.13.0's CPU code generator loads int8 a byte at a time and vectorizes at most 4 floats wide,
which left such products at ~3-6 GFLOP/s here; ours is C compiled by tinygrad's clang and run by tinygrad
as a custom kernel, so it sits in the same JIT graph as every other kernel. It also takes the work around
the product that would otherwise be kernels of their own (each kernel launch costs ~10 us here, more with
a second thread): the RMS norm before it, the residual add after it, and SiLU(gate) * up between the
feed-forward's two products. Where the CPU has AVX-512 VNNI, 4-bit products are integer dot products
against x quantized to int16 per block. Off the CPU the same blocks are
dequantized inside ordinary tinygrad ops.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor, dtypes, nn
from tinygrad.device import Compiler
from tinygrad.helpers import CPU_COUNT
from tinygrad.renderer import Estimates

from tinygrad_backend import step_runner
from tinygrad_backend.cpu_kernel import (
    TWO_THREADS_FROM,
    TWO_THREADS_FROM_STEP_RUNNER,
    DeviceName,
    Kernel,
    compile_kernel,
    compiler_for,
    kernel_text,
    run,
)
from tinygrad_backend.gguf_file import GGUFHeader

BLOCK = 32  # weights per scale and offset, as in the GGUF formats this model family ships in
Q4_0, Q4_1 = 2, 3  # ggml type ids of the 4-bit blocks we take from the file as they are
INTEGER_DOTS = True  # 4-bit products as integer dot products where the CPU has them (AVX-512 VNNI); see the C
STACK_FLOATS = 1 << 16  # the kernel keeps normalized inputs and one dequantized weight row on its stack


@dataclass(frozen=True)
class Packed:
    """q: (rows, cols) int8 steps or (rows, cols / 2) uint8 nibble pairs; scale, offset: (rows, cols / BLOCK)
    fp32. (GGUF keeps them as fp16, a fifth fewer bytes for a 4-bit row, but converting them in the kernel
    measured slower here: the product is bound by its instructions more than by memory.)"""

    bits: int
    q: np.ndarray
    scale: np.ndarray
    offset: np.ndarray

    def dequantize(self) -> np.ndarray:
        rows = self.scale.shape[0]
        if self.bits == 8:
            steps = self.q.reshape(rows, -1, BLOCK).astype(np.float32)
        else:  # GGUF's nibble order: a block's 16 bytes hold weights 0-15 in their low and 16-31 in their high nibbles
            pairs = self.q.reshape(rows, -1, BLOCK // 2)
            steps = np.concatenate([pairs & 15, pairs >> 4], axis=-1).astype(np.float32)
        return (steps * self.scale[..., None] + self.offset[..., None]).reshape(rows, -1)


def requantize(weight: np.ndarray) -> Packed:
    """(rows, cols) fp32 -> 8-bit blocks with each block's min and max as the ends of its 255 steps."""
    if weight.shape[0] > 4096:  # in parts: the temporaries of a 49152-row output layer would be ~0.5 GB
        return _stacked([requantize(weight[i:i + 4096]) for i in range(0, weight.shape[0], 4096)])
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // BLOCK, BLOCK).astype(np.float32)
    low, high = blocks.min(-1), blocks.max(-1)
    scale = (high - low) / 255
    offset = low + 128 * scale  # where step 0 lies
    step = np.where(scale == 0, 1, scale)[..., None]
    q = np.clip(np.rint((blocks - offset[..., None]) / step), -128, 127).astype(np.int8)
    return Packed(8, q.reshape(rows, cols), scale.astype(np.float32), offset.astype(np.float32))


def requantize_parts(parts: Iterable[np.ndarray]) -> Packed:
    """requantize() of the rows of `parts` stacked, without holding all of them in fp32 at once: blocks are
    rows' own, so this is requantize(np.concatenate(parts)) exactly."""
    return _stacked([requantize(part) for part in parts])


def pack(header: GGUFHeader, name: str, loaded: np.ndarray) -> Packed:
    """Tensor `name`, loaded by tinygrad as `loaded` (fp32): the file's own 4-bit blocks, else 8-bit ones."""
    return from_file(header, name, loaded) or requantize(loaded)


def from_file(header: GGUFHeader, name: str, loaded: np.ndarray) -> Packed | None:
    """The file's own 4-bit blocks of tensor `name`, if it has them and they reproduce `loaded` (the weight
    as tinygrad loaded it: it reorders the rows of Llama's q and k projections for its RoPE layout)."""
    info = header.tensor(name)
    if info is None or info.ggml_type not in (Q4_0, Q4_1) or len(info.shape) != 2:
        return None
    cols, rows = info.shape
    fields = [("d", "<f2")] + ([("m", "<f2")] if info.ggml_type == Q4_1 else []) + [("qs", "u1", (BLOCK // 2,))]
    raw = np.memmap(header.path, dtype=np.dtype(fields), mode="r", offset=header.data_start + info.offset,
                    shape=(rows, cols // BLOCK))
    scale = raw["d"].astype(np.float32)
    offset = raw["m"].astype(np.float32) if info.ggml_type == Q4_1 else -8 * scale
    packed = Packed(4, np.ascontiguousarray(raw["qs"]).reshape(rows, -1), scale, offset)
    for order in _row_orders(header, name, rows):
        candidate = Packed(4, packed.q[order], scale[order], offset[order])
        if np.allclose(candidate.dequantize(), loaded, rtol=1e-5, atol=1e-6):
            return candidate
    return None


def _row_orders(header: GGUFHeader, name: str, rows: int) -> list[np.ndarray]:
    """The file's row order, and tinygrad's RoPE reordering of it (Transformer.from_gguf): within each head,
    rows (h two) -> (two h)."""
    orders = [np.arange(rows)]
    arch = header.architecture
    heads_key = "attention.head_count" if name.endswith("attn_q.weight") else "attention.head_count_kv"
    heads = int(header.metadata.get(f"{arch}.{heads_key}", 0))
    if heads and rows % (2 * heads) == 0 and ("attn_q." in name or "attn_k." in name):
        orders.append(np.arange(rows).reshape(heads, -1, 2).transpose(0, 2, 1).reshape(-1))
    return orders


class PackedLinear:
    """A linear layer (no bias: callers add it) whose weight is packed; callable like tinygrad's nn.Linear."""

    def __init__(self, packed: Packed, device: DeviceName) -> None:
        self.bits = packed.bits
        self.out_features = packed.scale.shape[0]
        self.in_features = packed.scale.shape[1] * BLOCK
        self.q = Tensor(packed.q, device=device).realize()
        self.scale = Tensor(packed.scale, device=device).realize()
        self.offset = Tensor(packed.offset, device=device).realize()
        # decided here: tinygrad forbids touching devices while it traces the forward pass that calls us
        self._compiler = compiler_for(device)
        self._integer_dots = INTEGER_DOTS

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes()) for t in (self.q, self.scale, self.offset))

    def __call__(self, x: Tensor, norm: nn.RMSNorm | None = None, residual: Tensor | None = None,
                 glu: bool = False) -> Tensor:
        """x (..., in) -> (..., out): norm(x) first if given, residual added after; with `glu`, the weight's
        first half of rows is a gate and the second half an up projection, and the result SiLU(gate) * up."""
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).float()
        out_features = self.out_features // 2 if glu else self.out_features
        flat_residual = None if residual is None else residual.reshape(-1, out_features).float()
        count = int(rows.shape[0])
        if self._compiler is not None and count * self.in_features <= STACK_FLOATS and self.in_features <= STACK_FLOATS:
            out = _kernel(self, rows, norm, flat_residual, glu, self._compiler)
        else:
            out = self._tinygrad(rows if norm is None else norm(rows), glu)
            out = out if flat_residual is None else out + flat_residual
        return out.reshape(*lead, out_features)

    def _tinygrad(self, x: Tensor, glu: bool) -> Tensor:
        """The same product in plain tinygrad ops, for other devices: the blocks are dequantized in the matmul."""
        if self.bits == 8:
            steps = self.q.reshape(self.out_features, -1, BLOCK).float()
        else:
            pairs = self.q.reshape(self.out_features, -1, BLOCK // 2)
            steps = (pairs.bitwise_and(15)).cat(pairs.rshift(4), dim=-1).float()
        weight = (steps * self.scale.unsqueeze(-1) + self.offset.unsqueeze(-1)).reshape(self.out_features, -1)
        out = x @ weight.T
        if not glu:
            return out
        gate, up = out.chunk(2, dim=-1)
        return gate.silu() * up


class PackedBlock:
    """A transformer block's linear layers, packed, as four kernels: norm + q, k and v in one product; the
    attention output + residual; norm + SiLU(gate) * up; and the down projection + residual."""

    PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

    def __init__(self, parts: dict[str, Packed], biases: list[Tensor] | None, device: DeviceName) -> None:
        qkv = [parts["attn_q"], parts["attn_k"], parts["attn_v"]]
        gate_up = [parts["ffn_gate"], parts["ffn_up"]]
        self.qkv_sizes = [p.scale.shape[0] for p in qkv]
        self.qkv = PackedLinear(_stacked(qkv), device)
        self.qkv_bias = None if biases is None else Tensor.cat(*biases).realize()
        self.attn_output = PackedLinear(parts["attn_output"], device)
        self.gate_up = PackedLinear(_stacked(gate_up), device)
        self.ffn_down = PackedLinear(parts["ffn_down"], device)

    @staticmethod
    def build(block: object, header: GGUFHeader, index: int) -> PackedBlock | None:
        """Pack `block` (tinygrad's TransformerBlock number `index`) if it is a dense one whose layers all fit."""
        layers = {name: getattr(block, name, None) for name in PackedBlock.PROJECTIONS}
        if not all(isinstance(lin, nn.Linear) and lin.weight.shape[1] % BLOCK == 0 for lin in layers.values()):
            return None
        linear = {name: lin for name, lin in layers.items() if isinstance(lin, nn.Linear)}
        parts = {}
        for name, lin in linear.items():
            loaded = lin.weight.float().numpy()
            parts[name] = pack(header, f"blk.{index}.{name}.weight", loaded)
        biases = [linear[n].bias for n in ("attn_q", "attn_k", "attn_v")]
        if any(b is not None for b in biases) and not all(b is not None for b in biases):
            return None
        return PackedBlock(parts, [b for b in biases if b is not None] or None, linear["attn_q"].weight.device)

    def flat_projections(self, x: Tensor, norm: nn.RMSNorm) -> Tensor:
        """q, k and v of norm(x), side by side in the last dimension."""
        qkv = self.qkv(x, norm=norm)
        return qkv if self.qkv_bias is None else qkv + self.qkv_bias

    def projections(self, x: Tensor, norm: nn.RMSNorm) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.flat_projections(x, norm).split(self.qkv_sizes, dim=-1)
        return q, k, v

    def feed_forward(self, h: Tensor, norm: nn.RMSNorm) -> Tensor:
        """h + down(SiLU(gate(norm(h))) * up(norm(h)))."""
        return self.ffn_down(self.gate_up(h, norm=norm, glu=True), residual=h)


def _stacked(parts: list[Packed]) -> Packed:
    """Several layers' rows as one weight; 4- and 8-bit parts cannot share a kernel, so then all are 8-bit."""
    if len({p.bits for p in parts}) == 1:
        return Packed(parts[0].bits, *(np.concatenate([getattr(p, f) for p in parts]) for f in ("q", "scale", "offset")))
    return _stacked([p if p.bits == 8 else requantize(p.dequantize()) for p in parts])


def _kernel(layer: PackedLinear, x: Tensor, norm: nn.RMSNorm | None, residual: Tensor | None, glu: bool,
            compiler: Compiler) -> Tensor:
    rows = int(x.shape[0])
    out_features = layer.out_features // 2 if glu else layer.out_features
    work = rows * layer.out_features * layer.in_features
    split_from = TWO_THREADS_FROM_STEP_RUNNER if step_runner.enabled() else TWO_THREADS_FROM
    threads = CPU_COUNT.value if work >= split_from else 1
    eps = None if norm is None else float(norm.eps)
    kernel = _compiled(compiler, _Shape(rows, layer.out_features, layer.in_features, layer.bits, threads, eps,
                                        residual is not None, glu, layer._integer_dots))
    inputs = [x, layer.q, layer.scale, layer.offset]
    if norm is not None:
        assert norm.weight is not None
        inputs.append(norm.weight.float())
    if residual is not None:
        inputs.append(residual)
    # for tinygrad's counters (DEBUG=2's GFLOPS and GB/s, bench-backend's bytes read per token)
    weight_bytes = layer.nbytes
    activations = 4 * (rows * layer.in_features + rows * out_features * (2 if residual is not None else 1))
    estimates = Estimates(ops=2 * work, lds=weight_bytes + activations, mem=weight_bytes + activations)
    return run(kernel, Tensor.empty(rows, out_features, dtype=dtypes.float, device=x.device), inputs, estimates)


@dataclass(frozen=True)
class _Shape:
    rows: int
    out_features: int  # rows of the weight (both halves, with glu)
    in_features: int
    bits: int
    threads: int
    eps: float | None  # RMS norm first, with this epsilon
    residual: bool
    glu: bool
    integer_dots: bool


def _compiled(compiler: Compiler, s: _Shape) -> Kernel:
    name = (f"packed{s.bits}_{s.rows}_{s.out_features}_{s.in_features}{'_norm' if s.eps is not None else ''}"
            f"{'_glu' if s.glu else ''}{'_res' if s.residual else ''}{'_int' if s.integer_dots else ''}_t{s.threads}")
    defines = {"ROWS": s.rows, "OUT": s.out_features, "IN": s.in_features, "BITS": s.bits, "THREADS": s.threads,
               "NORM": int(s.eps is not None), "EPS": f"{s.eps or 0.0:.9g}f", "RESIDUAL": int(s.residual),
               "GLU": int(s.glu), "INTEGER_DOTS": int(s.integer_dots)}
    return compile_kernel(compiler, name, kernel_text("packed_matmul.c", name, defines), s.threads)
