"""Attention as one CPU kernel of ours, for every row of a step: a decode step's one token per slot, or a
prompt chunk's tokens of one sequence.

In tinygrad ops a decode step's attention is eight kernels a block (copies of q and k out of the fused
projection, RoPE and the KV cache write, scores, max, sum, softmax, weighted values), each tiny at short
context, so their launches cost more than their work: ~4 ms of an ~18 ms step for SmolLM2-135M's 30 blocks.
This kernel does it all for every row (slot) of the step: RoPE on q and k, k and v into the slot's cache row
at its position, then softmax(q k^T / sqrt(d)) v over positions 0..pos, query heads grouped over their kv
head. A prompt chunk's tokens go through the very same arithmetic, row by row, as tokens decoded one at a
time: logits do not depend on how a prompt was fed (in chunks, a token at a time, or partly from a cached
prefix), so a seeded sample is the same either way. (With tinygrad's attention for chunks they differed by
~5e-5, and the integer dot products of packed_weights.py amplify any difference to ~5e-3: enough to change
a seeded draw at temperature 1.5.)
"""

from __future__ import annotations

import math

from tinygrad import Tensor, dtypes
from tinygrad.helpers import CPU_COUNT
from tinygrad.llm.model import TransformerConfig
from tinygrad.renderer import Estimates

from tinygrad_backend.cpu_kernel import C_HELPERS, DeviceName, compile_kernel, compiler_for, run


class AttentionKernel:
    def __init__(self, config: TransformerConfig, slots: int, room: int, device: DeviceName) -> None:
        self.config, self.slots, self.room = config, slots, room
        self._compiler = compiler_for(device)
        c = config
        # the kernel handles the plain layout: no gated output, head dims a whole number of 16-float vectors
        self.available = (self._compiler is not None and not c.attn_output_gate and c.head_dim % 16 == 0
                          and c.rope_dim % 2 == 0 and c.n_heads % c.n_kv_heads == 0)

    def __call__(self, qkv: Tensor, cache: Tensor, freqs: Tensor, where: Tensor) -> Tensor:
        """qkv (rows, q + k + v features) of this step's tokens, RoPE not yet applied; where (rows, 2) int32:
        each row's slot and position (rows of one slot in order of position). Writes k and v into `cache`
        (2, slots, kv heads, room, head dim), halves; returns the attention output, (rows, heads * head dim)."""
        assert self._compiler is not None
        c = self.config
        rows = int(qkv.shape[0])
        # a second thread pays off only with several rows to share out (and kv heads to share them by)
        threads = min(CPU_COUNT.value, c.n_kv_heads) if rows >= 4 else 1
        defines = {"ROWS": rows, "HEADS": c.n_heads, "KV_HEADS": c.n_kv_heads, "HD": c.head_dim, "ROPE": c.rope_dim,
                   "SLOTS": self.slots, "ROOM": self.room, "SCALE": f"{1 / math.sqrt(c.head_dim):.9g}f", "THREADS": threads}
        name = f"attention_{rows}_{c.n_heads}_{c.n_kv_heads}_{c.head_dim}_t{threads}"
        source = "".join(f"#define {k} {v}\n" for k, v in defines.items()) + C_HELPERS + _SOURCE.replace("NAME", name)
        kernel = compile_kernel(self._compiler, name, source, threads)
        # tinygrad's counters want a number; the context read varies per call, so count the new token's share
        estimates = Estimates(ops=4 * rows * c.n_heads * c.head_dim, mem=4 * int(qkv.numel()))
        out = Tensor.empty(rows, c.n_heads * c.head_dim, dtype=dtypes.float, device=qkv.device)
        return run(kernel, out, [qkv, cache, freqs, where], estimates, written=(1,))


_SOURCE = r"""
#define QDIM (HEADS * HD)
#define KVDIM (KV_HEADS * HD)
#define GROUP (HEADS / KV_HEADS)
// the cache holds halves (forward.py says why); clang converts 16 at a time (vcvtph2ps, vcvtps2ph)
typedef __fp16 f16x16 __attribute__((aligned(2), ext_vector_type(16)));

// tinygrad's RoPE layout (half split): x[i] and x[i + ROPE/2] rotate together; freqs holds cos then sin
static inline void rope(const float* restrict x, const float* restrict freqs, float* restrict out) {
  for (int i = 0; i < ROPE / 2; i++) {
    float c = freqs[i], s = freqs[ROPE / 2 + i];
    out[i] = x[i] * c - x[ROPE / 2 + i] * s;
    out[ROPE / 2 + i] = x[ROPE / 2 + i] * c + x[i] * s;
  }
  for (int i = ROPE; i < HD; i++) out[i] = x[i];
}

void NAME(float* restrict out, const float* restrict qkv, __fp16* restrict cache, const float* restrict freqs,
          const int* restrict where, int core_id) {
  // work shared out by kv head, rows in order: a thread writes the keys and values it then reads (a prompt
  // chunk's later rows read its earlier rows' keys), so none waits on another
  for (int job = 0; job < ROWS * KV_HEADS; job++) {
    const int r = job / KV_HEADS, kvh = job % KV_HEADS;
    if (kvh % THREADS != core_id) continue;
    const int slot = where[2 * r], pos = where[2 * r + 1];
    const float* row = qkv + (long)r * (QDIM + 2 * KVDIM);
    const float* cs = freqs + (long)pos * ROPE;
    __fp16* keys = cache + ((long)slot * KV_HEADS + kvh) * ROOM * HD;
    __fp16* values = cache + (((long)SLOTS + slot) * KV_HEADS + kvh) * ROOM * HD;
    float key[HD] __attribute__((aligned(64)));
    rope(row + QDIM + kvh * HD, cs, key);
    for (int i = 0; i < HD / 16; i++) {
      *(f16x16*)(keys + (long)pos * HD + 16 * i) = __builtin_convertvector(*(const f32x16*)(key + 16 * i), f16x16);
      *(f16x16*)(values + (long)pos * HD + 16 * i) =
        __builtin_convertvector(*(const f32x16*)(row + QDIM + KVDIM + kvh * HD + 16 * i), f16x16);
    }

    float scores[ROOM];
    for (int g = 0; g < GROUP; g++) {
      const int h = kvh * GROUP + g;  // query head h reads kv head h / GROUP
      float q[HD] __attribute__((aligned(64)));
      rope(row + h * HD, cs, q);
      float best = -3.0e38f;
      for (int t = 0; t <= pos; t++) {
        f32x16 acc = 0;
        for (int d = 0; d < HD; d += 16)
          acc += *(const f32x16*)(q + d) * __builtin_convertvector(*(const f16x16*)(keys + (long)t * HD + d), f32x16);
        scores[t] = sum16(acc) * SCALE;
        best = scores[t] > best ? scores[t] : best;
      }
      float total = 0;
      for (int t = 0; t <= pos; t++) {
        scores[t] = exp_approx(scores[t] - best);
        total += scores[t];
      }
      f32x16 acc[HD / 16];
      for (int i = 0; i < HD / 16; i++) acc[i] = 0;
      for (int t = 0; t <= pos; t++)
        for (int i = 0; i < HD / 16; i++)
          acc[i] += scores[t] * __builtin_convertvector(*(const f16x16*)(values + (long)t * HD + 16 * i), f32x16);
      float* o = out + (long)r * QDIM + h * HD;
      for (int i = 0; i < HD / 16; i++) *(f32x16*)(o + 16 * i) = acc[i] / total;
    }
  }
}
"""
