"""The transformer's forward pass over a KV cache with one row ("slot") per sequence being generated.

tinygrad 0.13.0's blocks keep one KV cache and one position for the whole batch, so every sequence in a
batch would have to be at the same position. Generations arrive at different times with prompts of
different lengths, so we keep tinygrad's weights and layers (attention projections, norms, feed-forward)
and write the attention ourselves:

- `one_sequence` feeds T tokens of one sequence into its slot at `start_pos` (a 32-token prompt chunk, or
  one token when only one sequence is running);
- `every_slot` feeds one token to every slot, each at its own position: one decode step for all running
  sequences, reading the weights once for all of them. On this CPU a step for 4 slots costs ~1.8x a
  step for one (26 vs 15 ms with packed weights).

A block with packed weights (packed_weights.py) runs its projections and feed-forward as our fused
kernels, and a step's attention (a decode step's or a prompt chunk's) is one kernel of ours too
(attention_kernel.py) where the device is the CPU; elsewhere everything is tinygrad ops. Positions are
symbolic variables (bound per call), so each function is captured by TinyJit once and replayed for any
position.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

from tinygrad import Tensor, UOp, dtypes, function
from tinygrad.device import Buffer
from tinygrad.llm.model import Transformer, TransformerBlock, TransformerConfig, precompute_freqs_cis
from tinygrad.uop.ops import resolve

from tinygrad_backend.attention_kernel import AttentionKernel
from tinygrad_backend.packed_weights import PackedBlock, PackedLinear
from tinygrad_backend.q8_embedding import embedding_device


class SlotForward:
    def __init__(self, net: Transformer, slots: int, chunk: int) -> None:
        """`chunk`: the most tokens one call of `one_sequence` feeds; the cache has that much room past the
        context, so a chunk padded to full length never writes outside it."""
        self.net, self.slots = net, slots
        # the architectures we load (gguf_file.SUPPORTED_ARCHITECTURES) are built of plain attention blocks
        self.blocks = cast(list[TransformerBlock], net.blk)
        c: TransformerConfig = self.blocks[0].config
        self.config = c
        # RoPE's table, realized once: tinygrad builds it lazily and would recompute it in every block
        room = c.max_context + chunk
        self.freqs = precompute_freqs_cis(c.rope_dim, room, c.rope_theta, device=embedding_device(net.token_embd))
        self.freqs.realize()
        # one kernel of ours for a step's attention, where it can run (the CPU)
        self.attention = AttentionKernel(c, slots, room, self.freqs.device)
        for block in self.blocks:
            # (keys and values, slot, kv head, position, head dim), realized, so the JITs capture real buffers.
            # Half precision, as llama.cpp's default: half the memory (~180 MB for 4 slots of SmolLM2's 2k
            # context) and half the bytes a decode step reads at a long position; arithmetic stays float.
            # Our attention kernel reads only positions a token has written, so its cache needs no zeros: left
            # unwritten, the CPU's fresh pages are not resident until used (the cache's memory grows with the
            # positions the slots reach instead of all of it at start-up). tinygrad's attention reads stale
            # positions under its mask, which must be finite: zeros.
            shape = (2, slots, c.n_kv_heads, room, c.head_dim)
            if self.attention.available:  # allocated as Tensor.from_blob does: a real buffer, nothing written
                block.cache_kv = Tensor.empty(*shape, dtype=dtypes.half, device=self.freqs.device)
                buffer = block.cache_kv.uop.buffer
                assert isinstance(buffer, Buffer), "one device only"
                buffer.allocate()
            else:
                block.cache_kv = Tensor.zeros(*shape, dtype=dtypes.half, device=self.freqs.device).contiguous().realize()

    def one_sequence(self, tokens: Tensor, slot: UOp, start_pos: UOp, last: UOp | None = None,
                     where: Tensor | None = None) -> Tensor:
        """tokens (1, T) of the sequence in `slot`, the first at `start_pos`: logits after token `last` (default
        the last), (1, vocab). Tokens after `last` are padding: they only fill cache positions that the
        sequence's next tokens overwrite, and no earlier token attends to them. `where`: each token's
        [slot, position] as an int32 tensor (T, 2), for our attention kernel."""
        T = tokens.shape[1]
        if where is not None and self.attention.available:
            return self._run(tokens, self._attend_kernel, where, last=last)
        if not resolve(T != 1):
            return self._run(tokens, self._attend_one, slot, start_pos, last=last)
        # causal, lower-right aligned: token i of the chunk sees the cache up to start_pos + i. Built once for
        # all blocks, from a comparison: Tensor.triu costs O(context^2) work, in every block
        later = Tensor.arange(start_pos + T, device=tokens.device).reshape(1, -1) - start_pos  # type: ignore[operator]
        unseen = later > Tensor.arange(T, device=tokens.device).reshape(T, 1)
        mask = unseen.where(float("-inf"), 0.0).contiguous()
        return self._run(tokens, self._attend_one, slot, start_pos, mask, last=last)

    def every_slot(self, tokens: Tensor, where: Tensor, length: UOp, *slot_positions: UOp) -> Tensor:
        """One token per slot, tokens (slots, 1), slot i's at `slot_positions[i]`, also given as the rows
        [i, position] of the int tensor `where` (for our attention kernel, and for the mask of tinygrad's);
        `length` is the largest position + 1. Logits, (slots, vocab)."""
        if self.attention.available:
            return self._run(tokens, self._attend_kernel, where)
        S = self.slots
        # a slot sees its own cache up to its own position; positions past it hold stale tokens
        mask = (Tensor.arange(length, device=tokens.device).reshape(1, 1, 1, 1, length) > where[:, 1].reshape(S, 1, 1, 1, 1)) \
            .where(float("-inf"), 0.0).contiguous()
        return self._run(tokens, self._attend_every, mask, *slot_positions)

    def _attend_one(self, block: TransformerBlock, x: Tensor, slot: UOp, start_pos: UOp, mask: Tensor | None = None) -> Tensor:
        T = x.shape[1]
        q, k, v = self._qkv(block, x, self.freqs[start_pos:start_pos + T].reshape(1, 1, T, -1))
        cache = block.cache_kv
        written = cache[:, slot:slot + 1, :, start_pos:start_pos + T, :].uop.store(Tensor.stack(k, v).cast(cache.dtype).uop)
        kv = Tensor(cache.uop.after(written))
        keys, values = kv[0, slot:slot + 1, :, 0:start_pos + T, :], kv[1, slot:slot + 1, :, 0:start_pos + T, :]
        return self._attention(q, keys, values, mask)

    def _attend_every(self, block: TransformerBlock, x: Tensor, mask: Tensor, *slot_positions: UOp) -> Tensor:
        S = self.slots
        freqs = Tensor.cat(*[self.freqs[p:p + 1] for p in slot_positions]).reshape(S, 1, 1, -1)
        q, k, v = self._qkv(block, x, freqs)
        cache = block.cache_kv
        kv_new = Tensor.stack(k, v).cast(cache.dtype)  # (2, slots, kv heads, 1, head dim)
        written = [cache[:, i:i + 1, :, p:p + 1, :].uop.store(kv_new[:, i:i + 1].uop) for i, p in enumerate(slot_positions)]
        kv = Tensor(cache.uop.after(*written))
        length = mask.shape[-1]
        return self._attention(q, kv[0, :, :, 0:length, :], kv[1, :, :, 0:length, :], mask)

    def _attend_kernel(self, block: TransformerBlock, x: Tensor, where: Tensor) -> Tensor:
        """Our attention kernel, for (B, T) tokens with B * T rows of `where`."""
        B, T, _ = x.shape
        packed: PackedBlock | None = getattr(block, "packed", None)
        if packed is not None and not self.config.qk_norm:
            qkv = packed.flat_projections(x, block.attn_norm)
        else:
            q, k, v = self._projections(block, x)
            qkv = q.cat(k, v, dim=-1)
        return self.attention(qkv.reshape(B * T, -1), block.cache_kv, self.freqs, where).reshape(B, T, -1)

    def _attention(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> Tensor:
        """Scaled dot-product attention with grouped query heads: q (B, heads, T, head dim) against keys and
        values (B, kv heads, L, head dim), without copying keys and values once per query head as
        Tensor.scaled_dot_product_attention(enable_gqa=True) does: that copy made each prompt chunk cost
        1.2 ms more per token of context. `mask` broadcasts to (B, kv heads, group, T, L). Returns
        (B, T, heads * head dim)."""
        B, H, T, D = q.shape
        keys, values = keys.cast(q.dtype), values.cast(q.dtype)  # the cache holds halves
        kv_heads = keys.shape[1]
        group = H // kv_heads
        q = q.reshape(B, kv_heads, group * T, D)  # query head h reads kv head h // group
        # keys times queries, not queries times keys: with the context length L symbolic, tinygrad's kernel for
        # q @ k^T ran single-threaded at ~1 GFLOP/s (20 ms a block at 1k tokens); this order reads each key
        # once against all of a kv head's queries
        scores = (keys @ q.transpose(-2, -1)).contiguous().transpose(-2, -1) / math.sqrt(D)  # (B, kv heads, group*T, L)
        scores = scores.reshape(B, kv_heads, group, T, -1)
        if mask is not None:
            scores = scores + mask
        out = (scores.softmax(-1) @ values.unsqueeze(2)).reshape(B, H, T, D)
        # with one token the transpose moves nothing; leaving it out spares a copy kernel a block
        return out.reshape(B, T, H * D) if T == 1 else out.transpose(1, 2).reshape(B, T, H * D)

    def _run(self, tokens: Tensor, attend: Callable[..., Tensor], *args: Tensor | UOp, last: UOp | None = None) -> Tensor:
        net = self.net
        x = net.token_embd(tokens).float()  # (B, T, D)
        for block in self.blocks:
            # as TransformerBlock.__call__: a tinygrad function, so the 30 blocks, alike but for their weights
            # (implicit inputs), are scheduled once instead of 30 times; capturing a JIT takes a third of the time
            @function(precompile=True, allow_implicit=True)
            def run(x: Tensor, *args: Tensor | UOp, block: TransformerBlock = block) -> Tensor:
                B, T, _ = x.shape
                a = attend(block, x, *args)  # (B, T, heads * head dim)
                packed: PackedBlock | None = getattr(block, "packed", None)
                if packed is not None:  # fused kernels: the norms and residual adds happen inside them
                    return packed.feed_forward(packed.attn_output(a, residual=x), block.ffn_norm).contiguous()
                h = x + block.attn_output(a)
                return (h + block._feed_forward(block.ffn_norm(h))).contiguous()
            x = run(x, *args)
        # only one position's logits are wanted; contiguous gives the JIT an output buffer of its own
        x = x[:, -1, :] if last is None else x[:, last:last + 1, :].reshape(x.shape[0], -1)
        packed_output: PackedLinear | None = getattr(net, "packed_output", None)
        if packed_output is not None:
            return packed_output(x, norm=net.output_norm).contiguous()
        return net.output(net.output_norm(x)).contiguous()

    def _qkv(self, block: TransformerBlock, x: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of the block's input x (before its attention norm) as (B, heads, T, head dim),
        RoPE applied."""
        c = self.config
        B, T, _ = x.shape
        q, k, v = self._projections(block, x)
        q = q.reshape(B, T, c.n_heads, c.head_dim).transpose(1, 2)
        k = k.reshape(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = v.reshape(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        return _rope(q, freqs, c.rope_dim), _rope(k, freqs, c.rope_dim), v

    def _projections(self, block: TransformerBlock, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values as (B, T, features), before RoPE; as TransformerBlock._attention (Llama,
        and Qwen2/Qwen3 with their qkv bias and q/k norms)."""
        c = self.config
        B, T, _ = x.shape
        packed: PackedBlock | None = getattr(block, "packed", None)
        if packed is not None:
            q, k, v = packed.projections(x, block.attn_norm)
        else:
            x = block.attn_norm(x)
            q, k, v = block.attn_q(x), block.attn_k(x), block.attn_v(x)
        if c.qk_norm and c.qk_norm != c.head_dim:
            q, k = block.attn_q_norm(q), block.attn_k_norm(k)
        if c.qk_norm == c.head_dim:  # per head
            q = block.attn_q_norm(q.reshape(B, T, c.n_heads, c.head_dim)).reshape(B, T, -1)
            k = block.attn_k_norm(k.reshape(B, T, c.n_kv_heads, c.head_dim)).reshape(B, T, -1)
        return q, k, v


def _rope(x: Tensor, freqs: Tensor, rope_dim: int) -> Tensor:
    """Rotate the first rope_dim features of each head (tinygrad's apply_rope, for a per-row table)."""
    cos, sin = freqs.chunk(2, dim=-1)
    x1, x2 = x[..., :rope_dim].chunk(2, dim=-1)
    return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1).cat(x[..., rope_dim:], dim=-1)
