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

from tinygrad_backend.cpu_kernel import DeviceName, compile_kernel, compiler_for, kernel_text, run


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
        kernel = compile_kernel(self._compiler, name, kernel_text("attention.c", name, defines), threads)
        # tinygrad's counters want a number; the context read varies per call, so count the new token's share
        estimates = Estimates(ops=4 * rows * c.n_heads * c.head_dim, mem=4 * int(qkv.numel()))
        out = Tensor.empty(rows, c.n_heads * c.head_dim, dtype=dtypes.float, device=qkv.device)
        return run(kernel, out, [qkv, cache, freqs, where], estimates, written=(1,))
