"""The model itself: GGUF weights run by tinygrad, giving next-token logits for a token sequence.

It knows nothing of HTTP or of requests. tinygrad 0.13.0's `Transformer` loads the weights; our forward
(`forward.py`) runs them over a KV cache with a row per slot, so several sequences decode in one step,
and returns logits instead of a token picked on the device, so sampling (temperature, top_p, seed) and
the agreement check against llama.cpp can see them. tinygrad is not thread-safe: one thread (the
engine's) calls this object.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tinygrad.llm.model as tinygrad_model
from tinygrad import Device, Tensor, TinyJit, UOp, dtypes, nn
from tinygrad.device import Buffer, LRUAllocator
from tinygrad.helpers import getenv
from tinygrad.llm.model import Transformer

from tinygrad_backend import step_runner, weights_file
from tinygrad_backend.cpu_kernel import compiler_for
from tinygrad_backend.forward import SlotForward
from tinygrad_backend.gguf_file import GGUFHeader
from tinygrad_backend.packed_weights import PackedBlock, PackedLinear, pack, requantize_parts
from tinygrad_backend.q8_embedding import Q8_0, Q8Embedding, embedding_device
from tinygrad_backend.step_runner import Replay

PREFILL_CHUNK = 32  # prompt tokens per prefill call, always this many (the last chunk padded): one concrete shape


WEIGHTS = ("auto", "packed", "quantized", "fp16", "fp32")
AUTO_FP32_LIMIT = 2 << 30  # off the CPU, `auto` keeps fp32 weights up to this size, else the file's quantized ones


def weight_mode(header: GGUFHeader, weights: str) -> str:
    if weights != "auto":
        return weights
    if compiler_for(Device.DEFAULT) is not None:
        return "packed"  # where our CPU kernels run, they are the fastest (packed_weights.py)
    return "fp32" if _parameter_count(header) * 4 <= AUTO_FP32_LIMIT else "quantized"


def _parameter_count(header: GGUFHeader) -> int:
    return sum(int(np.prod(t.shape)) for t in header.tensors)


def _load(header: GGUFHeader, context: int, mode: str) -> Transformer:
    """`quantized` keeps the file's blocks and dequantizes inside every matmul (least memory); `fp16`/`fp32`
    dequantize once at load and keep the result: more memory, much less work per token; `packed` keeps the
    linear layers in 4- or 8-bit blocks for our CPU kernel (packed_weights.py). `quantized` and `packed`
    load lazily: packing dequantizes one layer at a time, so the whole model is never held in fp32 (peak
    memory 1.1 GB -> 0.67 GB for SmolLM2-135M with 4 slots)."""
    half = os.environ.get("HALF")
    os.environ["HALF"] = "0" if mode in ("fp32", "packed") else "1"
    getenv.cache_clear()  # type: ignore[attr-defined]  # tinygrad caches environment reads; from_gguf reads HALF
    try:
        # Transformer.__init__ fills every Linear with random values that from_gguf then replaces with the
        # file's; building those lazy random graphs took 1.2 s of a 6 s load here. Loading runs on the engine
        # thread, the only one that touches tinygrad, so swapping the initializer for the load is safe.
        # And from_gguf reads the file through tinygrad's gguf_load, which copies all of it into memory and
        # keeps it while any weight is unrealized (98 MB through packing); ours maps each tensor's bytes
        # on its own (weights_file.py), read when realized and let go once packed.
        uniform = Tensor.__dict__["uniform"]  # the descriptor itself (a staticmethod), to put back as it was
        setattr(Tensor, "uniform", _uninitialized)  # noqa: B010 - the swap mypy would refuse as an assignment
        load = tinygrad_model.gguf_load
        tinygrad_model.gguf_load = lambda _path: weights_file.gguf_load(header)  # type: ignore[assignment,misc]
        try:
            net, _ = Transformer.from_gguf(header.path, context, realize=mode not in ("quantized", "packed"))
        finally:
            setattr(Tensor, "uniform", uniform)  # noqa: B010
            tinygrad_model.gguf_load = load
    finally:
        if half is None:
            os.environ.pop("HALF", None)
        else:
            os.environ["HALF"] = half
        getenv.cache_clear()  # type: ignore[attr-defined]
    if mode == "packed":
        _pack(net, header)
    return net


def _pack(net: Transformer, header: GGUFHeader) -> None:
    """Pack every dense block's linear layers, and the output layer; the fp32 weights they replace are
    freed. The token embedding stays the file's Q8_0 blocks where it is Q8_0 and our kernels run
    (q8_embedding.py: a lookup dequantizes the rows it reads), else fp32: a lookup reads one row of it."""
    for index, block in enumerate(net.blk):
        packed_block = PackedBlock.build(block, header, index)
        if packed_block is not None:
            block.packed = packed_block  # type: ignore[attr-defined]  # forward.py looks for it
            for name in PackedBlock.PROJECTIONS:
                delattr(block, name)
    device = embedding_device(net.token_embd)
    name = "output.weight" if header.tensor("output.weight") else "token_embd.weight"
    output = net.output.weight
    tied = output.uop is net.token_embd.weight.uop
    embedding = header.tensor("token_embd.weight")
    if embedding is not None and embedding.ggml_type == Q8_0 and compiler_for(device) is not None:
        q8 = Q8Embedding(header, "token_embd.weight", device)
        net.token_embd = q8  # type: ignore[assignment]  # forward.py calls it as it called nn.Embedding
        # tied (SmolLM2): the output layer is requantized from the same fp32 values, 4096 rows at a time
        packed = requantize_parts(q8.row_parts()) if tied else pack(header, name, output.float().numpy())
    elif tied:  # pack the embedding we keep, read where it lies
        packed = pack(header, name, _host_array(net.token_embd.weight.realize()))  # .numpy() copied it: 108 MB
    else:
        packed = pack(header, name, output.float().numpy())
    net.packed_output = PackedLinear(packed, output.device)  # type: ignore[attr-defined]
    del net.output, output, packed
    Tensor.realize(*nn.state.get_parameters(net))  # what stays unpacked (norms, the embedding), loaded lazily
    # tinygrad's allocator keeps freed buffers for reuse; give the fp32 weights' memory back to the system
    gc.collect()
    allocator = Device[device].allocator if isinstance(device, str) else None
    if isinstance(allocator, LRUAllocator):
        allocator.free_cache()


def _host_array(t: Tensor) -> np.ndarray:
    """A realized tensor's values as a numpy array: on the CPU its buffer itself (no copy; read only), else a copy."""
    buffer = _buffer(t)
    if compiler_for(buffer.device) is None:
        return t.numpy()
    view = buffer.as_memoryview(allow_zero_copy=True)  # the CPU allocator's own memory, after a synchronize
    return np.frombuffer(view, dtype=np.dtype(t.dtype.fmt)).reshape(t.shape)


def _uninitialized(*shape: int, low: float = 0.0, high: float = 1.0, dtype: Any = None, **kwargs: Any) -> Tensor:
    """Tensor.uniform's signature, without the random values (from_gguf overwrites them all)."""
    return Tensor.empty(*shape, dtype=dtype, **kwargs)


class InputBuffer:
    """A JIT input that lives as long as the model. Each call writes its values into the same device buffer,
    below tinygrad's scheduler: a Tensor made from a list per token costs a scheduling pass per input, which
    was a fifth of a decode step (BENCHMARKS.md) and tracks the host's Python speed."""

    def __init__(self, rows: int, columns: int, device: str) -> None:
        self.tensor = Tensor.zeros(rows, columns, dtype=dtypes.int32, device=device).contiguous().realize()
        self._buffer = _buffer(self.tensor)
        self._host = np.zeros((rows, columns), dtype=np.int32)

    def write(self, values: Any) -> Tensor:
        self._host[...] = values
        self._buffer.copyin(memoryview(self._host.data))
        return self.tensor


def _buffer(t: Tensor) -> Buffer:
    buffer = t.uop.base.buffer
    assert isinstance(buffer, Buffer), "one device only"
    return buffer


def _read(out: Tensor) -> np.ndarray:
    """The logits a JIT call wrote: copied out of its output buffer, which the next call overwrites."""
    return _buffer(out).numpy().reshape(out.shape)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    device: str
    max_context: int
    parameters: int
    weight_bytes: int


class Model:
    """Next-token logits for up to `slots` sequences at once, each keeping its tokens in its own KV cache row."""

    def __init__(self, header: GGUFHeader, max_context: int | None, progress: Callable[[str], None] = print,
                 weights: str = "auto", slots: int = 1, runner: bool | None = None) -> None:
        """`runner`: replay the JITs on the CPU through our step runner (step_runner.py) rather than tinygrad's
        CPU queue; None: as the environment says (DELEGATE_STEP_RUNNER, on unless 0)."""
        context = min(max_context or header.context_length, header.context_length)
        start = time.perf_counter()
        self.weights = weight_mode(header, weights)
        net = _load(header, context, self.weights)
        self._forward = SlotForward(net, slots, PREFILL_CHUNK)
        progress(f"weights loaded in {time.perf_counter() - start:.1f}s ({self.weights}, {slots} slot(s))")
        self.info = ModelInfo(
            name=header.name,
            architecture=header.architecture,
            device=Device.DEFAULT,
            max_context=context,
            parameters=_parameter_count(header),
            weight_bytes=header.path.stat().st_size,
        )
        self.slots = slots
        self._cached: list[list[int]] = [[] for _ in range(slots)]  # per slot, the tokens its KV cache holds
        self._slot = UOp.variable("slot", 0, slots - 1)
        self._start = UOp.variable("start_pos", 0, context - 1)
        self._last = UOp.variable("last", 0, PREFILL_CHUNK - 1)
        self._length = UOp.variable("length", 1, context)
        self._positions = [UOp.variable(f"pos{i}", 0, context - 1) for i in range(slots)]
        device = Device.DEFAULT
        self._one_token, self._one_where = InputBuffer(1, 1, device), InputBuffer(1, 2, device)
        self._chunk_tokens, self._chunk_where = InputBuffer(1, PREFILL_CHUNK, device), InputBuffer(PREFILL_CHUNK, 2, device)
        self._every_tokens, self._every_where = InputBuffer(slots, 1, device), InputBuffer(slots, 2, device)
        self._offsets = np.arange(PREFILL_CHUNK, dtype=np.int32)
        # One JIT per shape of work, every shape concrete: tinygrad's kernel heuristics optimize a known shape
        # far better than a symbolic one (a prompt chunk of exactly PREFILL_CHUNK tokens, padded, prefills
        # 2.3x faster here than 1-to-32 tokens did). A chunk of a prompt, one token of one sequence, and
        # one token of every slot.
        self._chunk = TinyJit(self._forward.one_sequence)
        self._token = TinyJit(self._forward.one_sequence)
        self._every = TinyJit(self._forward.every_slot)
        # once captured, each JIT replays as one call of our C runner on the CPU (tinygrad's own replay dispatched
        # its ~185 kernels a step from Python); the Tensor inputs are the InputBuffers above, in argument order
        use = step_runner.enabled() if runner is None else runner
        # and the variables each binds (our kernels take none but a chunk's `last`; tinygrad's attention, off the
        # attention kernel's layouts, takes positions)
        self.replays = {
            "chunk": Replay(self._chunk, (self._chunk_tokens.tensor, self._chunk_where.tensor),
                            ("slot", "start_pos", "last"), use),
            "token": Replay(self._token, (self._one_token.tensor, self._one_where.tensor), ("slot", "start_pos"), use),
            "every": Replay(self._every, (self._every_tokens.tensor, self._every_where.tensor),
                            ("length", *(v.expr for v in self._positions)), use),
        }

    @property
    def max_context(self) -> int:
        return self.info.max_context

    def forget(self, slot: int | None = None) -> None:
        """Treat a slot's KV cache (or every slot's) as empty: its next call feeds its whole sequence."""
        for i in range(self.slots) if slot is None else (slot,):
            self._cached[i] = []

    def reusable_prefix(self, tokens: list[int], slot: int = 0) -> int:
        """How many leading tokens of `tokens` the slot's KV cache already holds (at least one is always fed)."""
        n = 0
        for a, b in zip(tokens[:-1], self._cached[slot], strict=False):
            if a != b:
                break
            n += 1
        return n

    def feed(self, tokens: list[int], slot: int = 0, limit: int | None = None) -> np.ndarray | None:
        """Feed at most `limit` of the tokens the slot's KV cache lacks. Once all of `tokens` is in, the logits
        for the token after them, shape (vocab,); None while some are still to feed (a long prompt in parts,
        so other slots can decode between them)."""
        if not 0 < len(tokens) <= self.max_context:
            raise ValueError(f"{len(tokens)} tokens do not fit a context of {self.max_context}")
        pos = self.reusable_prefix(tokens, slot)
        end = len(tokens) if limit is None else min(len(tokens), pos + limit)
        out: Tensor | None = None
        while pos < end:
            n = min(PREFILL_CHUNK, end - pos)
            out = self._feed_one(tokens[pos], slot, pos) if n == 1 else self._feed_chunk(tokens[pos:pos + n], slot, pos)
            pos += n
            self._cached[slot] = tokens[:pos]
        if pos < len(tokens):
            return None
        assert out is not None
        return _read(out).reshape(-1)

    def _feed_one(self, token: int, slot: int, pos: int) -> Tensor:
        tokens, where = self._one_token.write(token), self._one_where.write((slot, pos))
        # realizing writes the KV cache (our runner's replay has run when it returns)
        return self.replays["token"](
            lambda: self._token(tokens, self._slot.bind(slot), self._start.bind(pos), None, where).realize(),
            slot=slot, start_pos=pos)

    def _feed_chunk(self, chunk: list[int], slot: int, pos: int) -> Tensor:
        n = len(chunk)
        where = self._chunk_where.write(np.stack([np.full(PREFILL_CHUNK, slot), pos + self._offsets], axis=1))
        tokens = self._chunk_tokens.write(chunk + [0] * (PREFILL_CHUNK - n))
        return self.replays["chunk"](
            lambda: self._chunk(tokens, self._slot.bind(slot), self._start.bind(pos), self._last.bind(n - 1), where).realize(),
            slot=slot, start_pos=pos, last=n - 1)

    def next_logits(self, tokens: list[int], slot: int = 0) -> np.ndarray:
        """Logits for the token after `tokens`, feeding only what the slot's KV cache lacks. Shape (vocab,)."""
        logits = self.feed(tokens, slot)
        assert logits is not None
        return logits

    def step(self, sequences: dict[int, list[int]]) -> dict[int, np.ndarray]:
        """One decode step for several slots at once: each sequence lacks only its last token in its slot's
        KV cache. Logits for the token after each, by slot."""
        if len(sequences) == 1 or self.slots == 1:
            return {slot: self.next_logits(seq, slot) for slot, seq in sequences.items()}
        positions = []
        tokens = []
        for slot in range(self.slots):
            seq = sequences.get(slot)
            if seq is None:  # an idle slot computes a throwaway row: write it just past what its cache holds
                pos = min(len(self._cached[slot]), self.max_context - 1)
                self._cached[slot] = self._cached[slot][:pos]
                positions.append(pos)
                tokens.append(0)
                continue
            if not 0 < len(seq) <= self.max_context or self.reusable_prefix(seq, slot) != len(seq) - 1:
                raise ValueError(f"slot {slot}: a decode step feeds exactly one token the cache lacks")
            positions.append(len(seq) - 1)
            tokens.append(seq[-1])
        where = self._every_where.write(np.stack([np.arange(self.slots), positions], axis=1))
        tokens_in = self._every_tokens.write(np.array(tokens).reshape(-1, 1))
        length = max(positions) + 1
        out = self.replays["every"](lambda: self._every(
            tokens_in, where, self._length.bind(length), *[v.bind(p) for v, p in zip(self._positions, positions, strict=True)],
        ).realize(), length=length, **{v.expr: p for v, p in zip(self._positions, positions, strict=True)})
        logits = _read(out)
        for slot, seq in sequences.items():
            self._cached[slot] = list(seq)
        return {slot: logits[slot] for slot in sequences}

    def warm_up(self, progress: Callable[[str], None] = print) -> None:
        """Compile and capture every JIT (prompt chunk, one token, every slot) before the first request."""
        start = time.perf_counter()
        # Every buffer the forward writes (the KV cache) already exists, so each JIT can capture on its first
        # call instead of its second (TinyJit's default, to let lazily created state become real first);
        # each call schedules the whole graph, ~4 s here.
        # (A first replay costs what later ones do, so capturing is enough.)
        self._chunk.cnt = self._token.cnt = self._every.cnt = 1
        seq = [0, 1, 2]
        self.next_logits(seq)  # a prompt chunk
        self.next_logits(seq + [0])  # one token
        if self.slots > 1:
            self.next_logits([1], 1)
            self.step({0: seq + [0, 0], 1: [1, 0]})  # every slot
        self.forget()
        progress(f"kernels compiled in {time.perf_counter() - start:.1f}s; replayed by {self.replay_summary()}")

    def replay_summary(self) -> str:
        """Who replays each captured JIT: our step runner, or tinygrad (and why)."""
        return ", ".join(f"{name}: {r.status()}" for name, r in self.replays.items() if r.jit.captured is not None) \
            or "nothing captured yet"
