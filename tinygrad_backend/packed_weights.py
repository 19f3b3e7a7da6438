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

from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor, dtypes, nn
from tinygrad.device import Compiler
from tinygrad.helpers import CPU_COUNT
from tinygrad.renderer import Estimates

from tinygrad_backend.cpu_kernel import C_HELPERS, TWO_THREADS_FROM, DeviceName, Kernel, compile_kernel, compiler_for, run
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
    threads = CPU_COUNT.value if work >= TWO_THREADS_FROM else 1
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
    source = "".join(f"#define {k} {v}\n" for k, v in defines.items()) + C_HELPERS + _SOURCE.replace("NAME", name)
    return compile_kernel(compiler, name, source, s.threads)


# Compiled once per shape and option set: constants let clang unroll and vectorize. Self-contained C (no
# libc, not even expf), because tinygrad loads the object code into memory itself.
_SOURCE = r"""
#define BLOCKS (IN / 32)
#define FEW 8  // rows of x up to which each weight block is converted as it is used, else a whole row first
#define BLOCK_BYTES (BITS == 4 ? 16 : 32)
#define OUTPUTS (GLU ? OUT / 2 : OUT)

// the 32 steps of block b of a weight row, as two vectors of 16
static inline void steps(const unsigned char* row, int b, f32x16* lo, f32x16* hi) {
#if BITS == 4
  u8x16 v = *(const u8x16*)(row + b * 16);
  *lo = __builtin_convertvector(v & (unsigned char)15, f32x16);
  *hi = __builtin_convertvector(v >> (unsigned char)4, f32x16);
#else
  *lo = __builtin_convertvector(*(const i8x16*)(row + b * 32), f32x16);
  *hi = __builtin_convertvector(*(const i8x16*)(row + b * 32 + 16), f32x16);
#endif
}

// the products of weight row n with every row of x, into dot[ROWS]
static inline void row_dots(int n, const unsigned char* restrict q, const float* restrict scale,
                            const float* restrict offset, const float* restrict x, const float* restrict xsum,
                            float* restrict dot) {
  const unsigned char* row = q + (long)n * BLOCKS * BLOCK_BYTES;
  const float* s = scale + (long)n * BLOCKS;
  const float* o = offset + (long)n * BLOCKS;
#if ROWS <= FEW
  // few rows of x (decode, one per slot): convert each block once, as it is used, for every row of x; the
  // offsets multiply each block's sum of x. (Interleaving several weight rows measured slower here.)
  f32x16 acc[ROWS];
  float shift[ROWS];
  for (int r = 0; r < ROWS; r++) { acc[r] = 0; shift[r] = 0; }
  for (int b = 0; b < BLOCKS; b++) {
    f32x16 lo, hi;
    steps(row, b, &lo, &hi);
    for (int r = 0; r < ROWS; r++) {
      const float* xr = x + r * IN + b * 32;
      acc[r] += (lo * *(const f32x16*)xr + hi * *(const f32x16*)(xr + 16)) * s[b];
      shift[r] += o[b] * xsum[r * BLOCKS + b];
    }
  }
  for (int r = 0; r < ROWS; r++) dot[r] = sum16(acc[r]) + shift[r];
#else
  // many rows of x (a prompt chunk): dequantize the weight row once, then use it for four rows of x at a time
  float w[IN] __attribute__((aligned(64)));
  for (int b = 0; b < BLOCKS; b++) {
    f32x16 lo, hi;
    steps(row, b, &lo, &hi);
    float sb = s[b], ob = o[b];
    *(f32x16*)(w + b * 32) = lo * sb + ob;
    *(f32x16*)(w + b * 32 + 16) = hi * sb + ob;
  }
  int r = 0;
  for (; r + 4 <= ROWS; r += 4) {
    const float* x0 = x + r * IN;
    f32x16 a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (int k = 0; k < IN; k += 16) {
      f32x16 wk = *(const f32x16*)(w + k);
      a0 += wk * *(const f32x16*)(x0 + k);
      a1 += wk * *(const f32x16*)(x0 + IN + k);
      a2 += wk * *(const f32x16*)(x0 + 2 * IN + k);
      a3 += wk * *(const f32x16*)(x0 + 3 * IN + k);
    }
    dot[r] = sum16(a0); dot[r + 1] = sum16(a1); dot[r + 2] = sum16(a2); dot[r + 3] = sum16(a3);
  }
  for (; r < ROWS; r++) {
    f32x16 a = 0;
    for (int k = 0; k < IN; k += 16) a += *(const f32x16*)(w + k) * *(const f32x16*)(x + r * IN + k);
    dot[r] = sum16(a);
  }
#endif
}

// 4-bit weights on a CPU with AVX-512 VNNI: x is quantized to int16 per block of 32 (scale max|x| / 32767,
// so its rounding is ~1e-5 of the block's largest value: the sums stay those of the float path to a few
// parts per million) and each pair of blocks' products are integer dot products (vpdpwssd: 32 int16 pairs
// per instruction) instead of conversions to float and multiplies. (x as int8, as llama.cpp does it, is
// faster still, but its rounding lowered the next-token agreement with llama.cpp from 97% to 93%.)
#if BITS == 4 && INTEGER_DOTS && BLOCKS % 2 == 0 && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VNNI 1
typedef short i16x32 __attribute__((aligned(2), ext_vector_type(32)));
typedef int i32x16 __attribute__((aligned(2), ext_vector_type(16)));
typedef unsigned char u8x32 __attribute__((aligned(1), ext_vector_type(32)));

// each row of x into xq: per pair of blocks, their first 16 values each (32), then their last 16 each, the
// order a pair's 32 bytes of nibbles unpack to; dx: each block's scale; xsum: its sum (for the offsets)
static void quantize_x(const float* restrict x, short* restrict xq, float* restrict dx, float* restrict xsum) {
  for (int r = 0; r < ROWS; r++)
    for (int b = 0; b < BLOCKS; b++) {
      const float* xb = x + r * IN + b * 32;
      float top = 0, total = 0;
      for (int j = 0; j < 32; j++) {
        float a = xb[j] < 0 ? -xb[j] : xb[j];
        top = a > top ? a : top;
        total += xb[j];
      }
      float inv = top > 0 ? 32767 / top : 0;
      dx[r * BLOCKS + b] = top / 32767;
      xsum[r * BLOCKS + b] = total;
      short* dst = xq + r * IN + (b / 2) * 64 + (b % 2) * 16;
      for (int j = 0; j < 16; j++) {
        float lo = xb[j] * inv, hi = xb[16 + j] * inv;
        dst[j] = (short)(int)(lo + (lo >= 0 ? 0.5f : -0.5f));
        dst[32 + j] = (short)(int)(hi + (hi >= 0 ? 0.5f : -0.5f));
      }
    }
}

static inline void row_dots_int(int n, const unsigned char* restrict q, const float* restrict scale,
                                const float* restrict offset, const short* restrict xq,
                                const float* restrict dx, const float* restrict xsum, float* restrict dot) {
  const unsigned char* row = q + (long)n * BLOCKS * 16;
  const float* s = scale + (long)n * BLOCKS;
  const float* o = offset + (long)n * BLOCKS;
  // up to FEW rows of x (a decode step's slots) share each unpacked pair of blocks; more (a prompt chunk)
  // would not fit their sums in registers, so they take the weight row once per row of x
  enum { SHARED = ROWS <= FEW ? ROWS : 1 };
  for (int r0 = 0; r0 < ROWS; r0 += SHARED) {
    f32x16 acc[SHARED];
    for (int r = 0; r < SHARED; r++) acc[r] = 0;
    for (int p = 0; p < BLOCKS / 2; p++) {
      u8x32 v = *(const u8x32*)(row + p * 32);
      i16x32 lo = __builtin_convertvector(v & (unsigned char)15, i16x32);
      i16x32 hi = __builtin_convertvector(v >> (unsigned char)4, i16x32);
      for (int r = 0; r < SHARED; r++) {
        const short* xr = xq + (r0 + r) * IN + p * 64;
        const float* d = dx + (r0 + r) * BLOCKS + 2 * p;
        i32x16 sums = 0;
        sums = __builtin_ia32_vpdpwssd512(sums, (i32x16)lo, *(const i32x16*)xr);
        sums = __builtin_ia32_vpdpwssd512(sums, (i32x16)hi, *(const i32x16*)(xr + 32));
        // lanes 0-7 hold the first block's sums, 8-15 the second's
        float s0 = s[2 * p] * d[0], s1 = s[2 * p + 1] * d[1];
        f32x16 scales = {s0, s0, s0, s0, s0, s0, s0, s0, s1, s1, s1, s1, s1, s1, s1, s1};
        acc[r] += __builtin_convertvector(sums, f32x16) * scales;
      }
    }
    for (int r = 0; r < SHARED; r++) {
      float shift = 0;
      for (int b = 0; b < BLOCKS; b++) shift += o[b] * xsum[(r0 + r) * BLOCKS + b];
      dot[r0 + r] = sum16(acc[r]) + shift;
    }
  }
}
#else
#define VNNI 0
#endif

void NAME(float* restrict out, const float* restrict x_in, const unsigned char* restrict q,
          const float* restrict scale, const float* restrict offset,
#if NORM
          const float* restrict norm_weight,
#endif
#if RESIDUAL
          const float* restrict residual,
#endif
          int core_id) {
  // this thread's share of the outputs
  const int per = (OUTPUTS + THREADS - 1) / THREADS, lo = core_id * per;
  const int hi = lo + per < OUTPUTS ? lo + per : OUTPUTS;
#if NORM
  // RMS norm of each row of x, every thread for itself (IN multiply-adds a row, next to OUT * IN)
  float x[ROWS * IN] __attribute__((aligned(64)));
  for (int r = 0; r < ROWS; r++) {
    float ss = 0;
    for (int k = 0; k < IN; k++) ss += x_in[r * IN + k] * x_in[r * IN + k];
    float inv = 1.0f / __builtin_sqrtf(ss / IN + EPS);
    for (int k = 0; k < IN; k++) x[r * IN + k] = x_in[r * IN + k] * inv * norm_weight[k];
  }
#else
  const float* x = x_in;
#endif
#if VNNI
  short xq[ROWS * IN] __attribute__((aligned(64)));
  float dx[ROWS * BLOCKS], xsum[ROWS * BLOCKS];
  quantize_x(x, xq, dx, xsum);
#define ROW_DOTS(n, result) row_dots_int(n, q, scale, offset, xq, dx, xsum, result)
#else
#define ROW_DOTS(n, result) row_dots(n, q, scale, offset, x, xsum, result)
#endif
#if ROWS <= FEW && !VNNI
  float xsum[ROWS * BLOCKS];
  for (int r = 0; r < ROWS; r++)
    for (int b = 0; b < BLOCKS; b++) {
      f32x16 v = *(const f32x16*)(x + r * IN + b * 32) + *(const f32x16*)(x + r * IN + b * 32 + 16);
      xsum[r * BLOCKS + b] = sum16(v);
    }
#elif !VNNI
  const float* xsum = 0;
#endif
  float dot[ROWS], up[ROWS];
  for (int n = lo; n < hi; n++) {
    ROW_DOTS(n, dot);
#if GLU
    ROW_DOTS(n + OUTPUTS, up);
    for (int r = 0; r < ROWS; r++) dot[r] = dot[r] / (1.0f + exp_approx(-dot[r])) * up[r];
#endif
    for (int r = 0; r < ROWS; r++) {
#if RESIDUAL
      out[(long)r * OUTPUTS + n] = residual[(long)r * OUTPUTS + n] + dot[r];
#else
      out[(long)r * OUTPUTS + n] = dot[r];
#endif
    }
  }
}
"""
