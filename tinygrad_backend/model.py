"""The model itself: GGUF weights run by tinygrad, giving next-token logits for a token sequence.

It knows nothing of HTTP or of requests. tinygrad 0.13.0's `Transformer` does the work; we keep its
blocks and KV cache and change one thing: our forward returns the logits instead of a token picked on
the device, so sampling (temperature, top_p, seed) and the agreement check against llama.cpp can see
them. tinygrad is not thread-safe: one thread (the engine's) calls this object.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tinygrad import Device, Tensor, TinyJit, UOp
from tinygrad.helpers import getenv
from tinygrad.llm.model import Transformer, precompute_freqs_cis

from tinygrad_backend.gguf_file import GGUFHeader

PREFILL_CHUNK = 32  # prompt tokens per prefill step, as tinygrad.llm.model.Transformer.generate


WEIGHTS = ("auto", "quantized", "fp16", "fp32")
AUTO_FP32_LIMIT = 2 << 30  # `auto` keeps fp32 weights up to this size, else the file's quantized ones


def weight_mode(header: GGUFHeader, weights: str) -> str:
    if weights != "auto":
        return weights
    params = sum(int(np.prod(t.shape)) for t in header.tensors)
    return "fp32" if params * 4 <= AUTO_FP32_LIMIT else "quantized"


def _load(header: GGUFHeader, context: int, mode: str) -> Transformer:
    """`quantized` keeps the file's blocks and dequantizes inside every matmul (least memory); `fp16`/`fp32`
    dequantize once at load and keep the result: more memory, much less work per token."""
    half = os.environ.get("HALF")
    os.environ["HALF"] = "0" if mode == "fp32" else "1"
    getenv.cache_clear()  # type: ignore[attr-defined]  # tinygrad caches environment reads; from_gguf reads HALF
    try:
        net, _ = Transformer.from_gguf(header.path, context, realize=mode != "quantized")
    finally:
        if half is None:
            os.environ.pop("HALF", None)
        else:
            os.environ["HALF"] = half
        getenv.cache_clear()  # type: ignore[attr-defined]

    def forward(tokens: Tensor, start_pos: int | UOp) -> Tensor:
        x = net.token_embd(tokens).float()  # (B, T, D)
        for block in net.blk:
            x = block(x, start_pos)
        # only the last position's logits are wanted; contiguous gives the JIT an output buffer of its own
        # (a view into the (B, T, vocab) result would keep the offset of the T it was captured with)
        return net.output(net.output_norm(x[:, -1, :])).contiguous()  # (B, vocab)

    # from_gguf builds a plain Transformer, so swap its JITs for ones around the logits forward
    net.prefill_jit, net.rollout_jit = TinyJit(forward), TinyJit(forward)
    # RoPE's table (max_context x rope_dim of cos and sin) is built lazily and never realized, so every block
    # recomputed it on every step: 4.5 ms a layer at 2048 tokens of context, most of a decode step on a CPU.
    # The blocks fetch it through a functools.cache, so realizing the cached tensor once fixes them all.
    c = net.blk[0].config
    precompute_freqs_cis(c.rope_dim, c.max_context, c.rope_theta, device=Device.DEFAULT).realize()
    return net


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    device: str
    max_context: int
    parameters: int
    weight_bytes: int


class Model:
    def __init__(self, header: GGUFHeader, max_context: int | None, progress: Callable[[str], None] = print,
                 weights: str = "auto") -> None:
        context = min(max_context or header.context_length, header.context_length)
        start = time.perf_counter()
        self.weights = weight_mode(header, weights)
        self._net = _load(header, context, self.weights)
        params = _parameters(self._net)
        progress(f"weights loaded in {time.perf_counter() - start:.1f}s ({self.weights})")
        self.info = ModelInfo(
            name=header.name,
            architecture=header.architecture,
            device=Device.DEFAULT,
            max_context=context,
            parameters=sum(int(p.numel()) for p in params),
            weight_bytes=header.path.stat().st_size,
        )
        self._cached: list[int] = []  # the tokens whose keys and values sit in the KV cache
        self._start_var = UOp.variable("start_pos", 0, context - 1)
        self._len_var = UOp.variable("toks", 1, PREFILL_CHUNK)

    @property
    def max_context(self) -> int:
        return self.info.max_context

    def forget(self) -> None:
        """Treat the KV cache as empty: the next call feeds its whole sequence."""
        self._cached = []

    def reusable_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` the KV cache already holds (at least one is always fed)."""
        n = 0
        for a, b in zip(tokens[:-1], self._cached, strict=False):
            if a != b:
                break
            n += 1
        return n

    def next_logits(self, tokens: list[int]) -> np.ndarray:
        """Logits for the token after `tokens`, feeding only what the KV cache lacks. Shape (vocab,)."""
        if not 0 < len(tokens) <= self.max_context:
            raise ValueError(f"{len(tokens)} tokens do not fit a context of {self.max_context}")
        pos = self.reusable_prefix(tokens)
        # As Transformer.generate: the JIT sees a view into one context-sized buffer at a symbolic offset
        # and length; other shapes of input made replays of a captured prefill read the wrong tokens.
        buf = Tensor([tokens + [0] * (self.max_context - len(tokens))], dtype="int32")
        out: Tensor | None = None
        while pos < len(tokens):
            n = min(PREFILL_CHUNK, len(tokens) - pos)
            sp, nt = self._start_var.bind(pos), self._len_var.bind(n)
            jit = self._net.rollout_jit if n == 1 else self._net.prefill_jit
            out = jit(buf[:, sp : sp + nt].contiguous(), sp).realize()  # realizing writes the KV cache
            pos += n
        self._cached = list(tokens)
        assert out is not None
        return out.numpy().reshape(-1)

    def warm_up(self, progress: Callable[[str], None] = print) -> None:
        """Compile and capture both JITs (prefill and one-token decode) before the first request."""
        start = time.perf_counter()
        # TinyJit runs a function once uncaptured (so the state it creates, the KV cache and the compiled
        # blocks, becomes real) and captures it on the second call; each call schedules the whole graph
        # (~4 s here). One uncaptured prefill makes that state for both JITs, so the decode JIT can capture
        # on its first call.
        net = self._net
        self.forget()
        seq = [0, 1, 2]
        self.next_logits(seq)  # prefill, uncaptured: creates the state
        net.rollout_jit.cnt = 1
        seq.append(0)
        self.next_logits(seq)  # one-token decode, captured
        self.forget()
        seq = [0, 1, 2]
        self.next_logits(seq)  # prefill, captured
        seq.append(0)
        self.next_logits(seq)  # decode, the first replay
        self.forget()
        progress(f"kernels compiled in {time.perf_counter() - start:.1f}s")


def _parameters(net: Transformer) -> list[Tensor]:
    from tinygrad.nn.state import get_parameters

    return get_parameters(net)
