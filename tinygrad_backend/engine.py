"""The engine: one thread that owns the model and runs up to `slots` generations at once, admitted in
arrival order.

tinygrad is not thread-safe, so every tinygrad call happens on this thread: loading, warm-up and
generation. HTTP handlers submit a Generation and read its events from an asyncio queue; a handler
whose client went away cancels it, and the engine stops it at the next turn, freeing its slot.

No request can stop the engine: whatever fails while one generation is admitted, sampled or fed fails
that generation alone (a failed forward pass fails the generations in it, whose slots are then treated
as empty). What the engine cannot survive (its thread gone, or no progress while work waits) is
reported by `problem()`, which /health and the server's watchdog read.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tinygrad_backend.sampling import SamplingParams, StopMatcher, pick_token, token_logprobs
from tinygrad_backend.tokenizer import GGUFTokenizer

if TYPE_CHECKING:  # the model module imports tinygrad, which must not load before the device is chosen
    from tinygrad_backend.constraints import Constraint
    from tinygrad_backend.model import Model

log = logging.getLogger("tinygrad_backend")

PROMPT_TOKENS_PER_TURN = 32  # one prefill chunk of the model's


class ContextLengthExceeded(ValueError):
    def __init__(self, prompt_tokens: int, max_context: int) -> None:
        self.prompt_tokens, self.max_context = prompt_tokens, max_context
        super().__init__(
            f"This model's maximum context length is {max_context} tokens. However, your messages resulted in "
            f"{prompt_tokens} tokens. Please reduce the length of the messages."
        )


class NotReady(RuntimeError):
    """The model is still loading (or failed to load): try again later."""


@dataclass
class Timings:
    queued_ms: float = 0.0  # waiting for a free slot
    prompt_n: int = 0  # prompt tokens run through the model (the rest came from the KV cache)
    prompt_ms: float = 0.0  # prefill, up to the first token
    predicted_n: int = 0
    predicted_ms: float = 0.0  # after the first token

    @property
    def ttft_ms(self) -> float:
        return self.queued_ms + self.prompt_ms

    @property
    def predicted_per_second(self) -> float:
        return (self.predicted_n - 1) * 1000.0 / self.predicted_ms if self.predicted_n > 1 and self.predicted_ms else 0.0

    def as_dict(self, device: str) -> dict[str, float | int | str]:
        return {
            "queued_ms": round(self.queued_ms, 2), "prompt_n": self.prompt_n, "prompt_ms": round(self.prompt_ms, 2),
            "predicted_n": self.predicted_n, "predicted_ms": round(self.predicted_ms, 2),
            "predicted_per_second": round(self.predicted_per_second, 2), "ttft_ms": round(self.ttft_ms, 2),
            "device": device,
        }


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability, and the most likely alternatives with theirs (SamplingParams.logprobs)."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens this text completes, when logprobs were asked for


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    error: str | None = None


Event = TextDelta | Finished


@dataclass
class Generation:
    prompt: list[int]
    params: SamplingParams
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    _events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    submitted: float = field(default_factory=time.perf_counter)
    constraint: Constraint | None = None  # a grammar the tokens must follow (constraints.py)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _emit(self, event: Event) -> None:  # called from the engine thread
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone: nobody is listening
            self.cancel()

    async def events(self) -> AsyncGenerator[Event, None]:
        """Text deltas, then exactly one Finished. Leaving the loop early cancels the generation."""
        try:
            while True:
                event = await self._events.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self.cancel()


@dataclass
class _Running:
    """A generation that holds a slot: its tokens so far and its decoding state."""

    gen: Generation
    slot: int
    seq: list[int]
    rng: np.random.Generator
    decode: Callable[[int | None], str]
    stops: StopMatcher
    timings: Timings
    admitted: float
    first_token_at: float = 0.0
    produced: int = 0
    prefilled: bool = False
    reason: str | None = None  # set when it is done
    logprobs: list[TokenLogprob] = field(default_factory=list)  # chosen tokens whose text has not gone out yet


class QueueFull(RuntimeError):
    """More generations wait for a slot than the server allows: try again later."""


STALL_S = 60.0  # work waiting and no turn finished for this long: the engine is stuck


class Engine:
    def __init__(self, load: Callable[[], tuple[Model, GGUFTokenizer]], on_fatal: Callable[[BaseException], None],
                 max_waiting: int = 256, stall_s: float = STALL_S) -> None:
        """`load` runs on the engine thread and returns (model, tokenizer); `on_fatal` hears if it fails.
        At most `max_waiting` generations wait for a slot; more are refused (QueueFull)."""
        self._load, self._on_fatal = load, on_fatal
        self.max_waiting, self.stall_s = max_waiting, stall_s
        self._queue: queue.Queue[Generation | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.model: Model | None = None
        self.tokenizer: GGUFTokenizer | None = None
        self.ready = threading.Event()
        self._running: dict[int, _Running] = {}  # by slot
        self.progress_at = time.monotonic()  # when the engine last finished a turn, or last had nothing to do
        self.failure: str | None = None  # why the engine thread stopped, if it did

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def problem(self) -> str | None:
        """Why this engine cannot serve (None while it can): its thread stopped, or it is stuck."""
        if not self.ready.is_set():
            return None  # loading; a failed load stops the server (on_fatal)
        if not self._thread.is_alive():
            return f"the engine thread has stopped: {self.failure or 'unknown cause'}"
        stalled = time.monotonic() - self.progress_at
        if (self._running or self.waiting) and stalled > self.stall_s:
            return (f"the engine has made no progress for {stalled:.0f}s with {self.running} generation(s) running "
                    f"and {self.waiting} waiting")
        return None

    def submit(self, prompt: list[int], params: SamplingParams, constraint: Constraint | None = None) -> Generation:
        if not self.ready.is_set():
            raise NotReady("the model is still loading")
        assert self.model is not None
        max_context = self.model.max_context
        if len(prompt) >= max_context:
            raise ContextLengthExceeded(len(prompt), max_context)
        if self.waiting >= self.max_waiting:
            raise QueueFull(f"{self.waiting} generations are already waiting for a slot")
        gen = Generation(prompt, params, asyncio.get_running_loop(), constraint=constraint)
        if not self._running and not self.waiting:
            self.progress_at = time.monotonic()  # an idle engine's stall clock starts with its next work
        self._queue.put(gen)
        return gen

    def _run(self) -> None:
        try:
            self.model, self.tokenizer = self._load()
        except BaseException as e:  # noqa: BLE001 - whatever stops the load stops the server
            self._on_fatal(e)
            return
        self.ready.set()
        try:
            self._serve()
        except BaseException as e:  # the engine is gone: say why, and fail everything it held
            self.failure = f"{type(e).__name__}: {e}"
            log.critical("the engine stopped: %s", self.failure, exc_info=True)
            for r in list(self._running.values()):
                self._finish(r, "error", error="the engine stopped")
            while True:
                try:
                    gen = self._queue.get_nowait()
                except queue.Empty:
                    break
                if gen is not None:
                    gen._emit(Finished("error", len(gen.prompt), 0, Timings(), error="the engine stopped"))

    def _serve(self) -> None:
        # Continuous batching: every turn admits waiting generations into free slots, feeds one prompt chunk
        # (so a long prompt does not stall the others' tokens for its whole prefill), then runs one decode
        # step for every generation past its prompt, all slots in one forward pass.
        while self._admit():
            self._prefill_one()
            self._decode_all()
            for r in list(self._running.values()):
                if r.gen.cancelled:
                    self._finish(r, "cancelled")
            self.progress_at = time.monotonic()

    def _admit(self) -> bool:
        """Move waiting generations into free slots; block while there is nothing to do. False to stop."""
        model = self.model
        assert model is not None
        while len(self._running) < model.slots:
            if not self._running:
                self.progress_at = time.monotonic()  # nothing to do is not a stall
            try:
                gen = self._queue.get(block=not self._running)
            except queue.Empty:
                return True
            if gen is None:
                return False
            if gen.cancelled:
                gen._emit(Finished("cancelled", len(gen.prompt), 0, Timings()))
                continue
            try:
                self._start(gen)
            except Exception as e:  # this generation cannot start; the others go on
                log.exception("a generation failed to start")
                gen._emit(Finished("error", len(gen.prompt), 0, Timings(), error=_describe(e)))
        return True

    def _start(self, gen: Generation) -> None:
        model, tok = self.model, self.tokenizer
        assert model is not None and tok is not None
        rng = np.random.default_rng(gen.params.seed)
        free = [i for i in range(model.slots) if i not in self._running]
        # the free slot whose KV cache already holds most of this prompt (a chat's earlier turns)
        slot = max(free, key=lambda i: model.reusable_prefix(gen.prompt, i))
        now = time.perf_counter()
        timings = Timings(queued_ms=(now - gen.submitted) * 1000,
                          prompt_n=len(gen.prompt) - model.reusable_prefix(gen.prompt, slot))
        r = _Running(gen, slot, list(gen.prompt), rng, tok.stream_decoder(), StopMatcher(gen.params.stop), timings,
                     admitted=now)
        self._running[slot] = r
        if gen.constraint is not None:
            gen.constraint.prepare()  # the first mask, computed while the prompt is read
        if self._at_limit(r):
            self._finish(r, "length")

    def _prefill_one(self) -> None:
        """Feed one chunk of the oldest prompt still being read; its first token when it is all in."""
        pending = [r for r in self._running.values() if not r.prefilled]
        if not pending:
            return
        r = min(pending, key=lambda r: r.admitted)
        assert self.model is not None
        try:
            logits = self.model.feed(r.seq, r.slot, limit=PROMPT_TOKENS_PER_TURN)
        except Exception as e:  # noqa: BLE001 - only this prompt was being fed
            self._failed([r], e)
            return
        if logits is not None:
            r.prefilled = True
            self._advance(r, logits)

    def _decode_all(self) -> None:
        decoding = [r for r in self._running.values() if r.prefilled and not r.gen.cancelled]
        if not decoding:
            return
        assert self.model is not None
        try:
            logits = self.model.step({r.slot: r.seq for r in decoding})
        except Exception as e:  # noqa: BLE001 - the step fed every slot in it: each of them fails
            self._failed(decoding, e)
            return
        for r in decoding:
            self._advance(r, logits[r.slot])

    def _failed(self, failed: list[_Running], e: Exception) -> None:
        """A forward pass failed: what it wrote into these slots' KV caches cannot be trusted."""
        log.exception("a forward pass failed")
        assert self.model is not None
        for r in failed:
            self.model.forget(r.slot)
            self._finish(r, "error", error=_describe(e))

    def _advance(self, r: _Running, logits: np.ndarray) -> None:
        """Sample the next token from `logits`, stream its text, and finish the generation if it is done.
        Whatever fails here fails this generation alone."""
        try:
            self._next(r, logits)
        except Exception as e:  # sampling, decoding or stop matching, for one request
            log.exception("a generation failed while sampling")
            self._finish(r, "error", error=_describe(e))

    def _next(self, r: _Running, logits: np.ndarray) -> None:
        tok, params, constraint = self.tokenizer, r.gen.params, r.gen.constraint
        assert tok is not None
        # the grammar's mask was started when the last token was accepted: it is usually ready by now
        allowed = constraint.allowed() if constraint is not None else None
        token = pick_token(logits, params, r.rng, r.seq, allowed)
        if r.produced == 0:
            r.first_token_at = time.perf_counter()
            r.timings.prompt_ms = (r.first_token_at - r.admitted) * 1000
        if token in tok.end_ids:
            self._finish(r, "stop")
            return
        if constraint is not None:
            constraint.accept(token)  # and starts on the next mask, which runs beside the next forward pass
        if params.logprobs:
            chosen, top = token_logprobs(logits, token, params.top_logprobs)
            r.logprobs.append(TokenLogprob(tok.token_bytes(token), chosen,
                                           tuple((tok.token_bytes(t), lp) for t, lp in top)))
        r.seq.append(token)
        r.produced += 1
        text, hit_stop = r.stops.feed(r.decode(token))
        if text:
            r.gen._emit(TextDelta(text, self._take_logprobs(r)))
        if hit_stop or (constraint is not None and constraint.done):
            self._finish(r, "stop")
        elif self._at_limit(r):
            self._finish(r, "length")

    @staticmethod
    def _take_logprobs(r: _Running) -> tuple[TokenLogprob, ...]:
        taken = tuple(r.logprobs)
        r.logprobs.clear()
        return taken

    def _at_limit(self, r: _Running) -> bool:
        assert self.model is not None
        max_tokens = r.gen.params.max_tokens
        return len(r.seq) >= self.model.max_context or (max_tokens is not None and r.produced >= max_tokens)

    def _finish(self, r: _Running, reason: str, error: str | None = None) -> None:
        if self._running.get(r.slot) is not r:
            return
        del self._running[r.slot]
        if r.gen.constraint is not None:
            try:
                r.gen.constraint.close()
            except Exception:  # a mask that failed no longer matters: the generation is over
                log.exception("a grammar mask failed at the end of its generation")
        if not r.stops.hit and reason not in ("cancelled", "error"):
            try:
                tail, _ = r.stops.feed(r.decode(None))
                tail += r.stops.flush()  # a partial stop string at the very end is text after all
            except Exception as e:  # the text so far went out; the end of it cannot
                log.exception("a generation failed at its end")
                reason, error, tail = "error", _describe(e), ""
            if tail or r.logprobs:
                r.gen._emit(TextDelta(tail, self._take_logprobs(r)))
        t = r.timings
        t.predicted_n = r.produced
        t.predicted_ms = (time.perf_counter() - r.first_token_at) * 1000 if r.produced else 0.0
        r.gen._emit(Finished(reason, len(r.gen.prompt), r.produced, t, error=error))


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".split("\n", 1)[0][:300]
