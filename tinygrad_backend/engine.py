"""The engine: one thread that owns the model and runs generations, one at a time, in arrival order.

tinygrad is not thread-safe and the model has one KV cache, so every tinygrad call happens on this
thread: loading, warm-up and generation. HTTP handlers submit a Generation and read its events from an
asyncio queue; a handler whose client went away cancels it, and the engine stops at the next token.
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

from tinygrad_backend.sampling import SamplingParams, StopMatcher, pick_token
from tinygrad_backend.tokenizer import GGUFTokenizer

if TYPE_CHECKING:  # the model module imports tinygrad, which must not load before the device is chosen
    from tinygrad_backend.model import Model

log = logging.getLogger("tinygrad_backend")


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
    queued_ms: float = 0.0  # waiting for earlier generations
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
class TextDelta:
    text: str


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


class Engine:
    def __init__(self, load: Callable[[], tuple[Model, GGUFTokenizer]], on_fatal: Callable[[BaseException], None]):
        """`load` runs on the engine thread and returns (model, tokenizer); `on_fatal` hears if it fails."""
        self._load, self._on_fatal = load, on_fatal
        self._queue: queue.Queue[Generation | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.model: Model | None = None
        self.tokenizer: GGUFTokenizer | None = None
        self.ready = threading.Event()
        self.busy = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, prompt: list[int], params: SamplingParams) -> Generation:
        if not self.ready.is_set():
            raise NotReady("the model is still loading")
        assert self.model is not None
        max_context = self.model.max_context
        if len(prompt) >= max_context:
            raise ContextLengthExceeded(len(prompt), max_context)
        gen = Generation(prompt, params, asyncio.get_running_loop())
        self._queue.put(gen)
        return gen

    def _run(self) -> None:
        try:
            self.model, self.tokenizer = self._load()
        except BaseException as e:  # noqa: BLE001 - whatever stops the load stops the server
            self._on_fatal(e)
            return
        self.ready.set()
        while (gen := self._queue.get()) is not None:
            if gen.cancelled:
                gen._emit(Finished("cancelled", len(gen.prompt), 0, Timings()))
                continue
            self.busy = True
            try:
                gen._emit(self._generate(gen))
            except Exception as e:
                log.exception("generation failed")
                gen._emit(Finished("error", len(gen.prompt), 0, Timings(), error=f"{type(e).__name__}: {e}"))
            finally:
                self.busy = False

    def _generate(self, gen: Generation) -> Finished:
        model, tok, params = self.model, self.tokenizer, gen.params
        assert model is not None and tok is not None
        start = time.perf_counter()
        timings = Timings(queued_ms=(start - gen.submitted) * 1000, prompt_n=len(gen.prompt) - model.reusable_prefix(gen.prompt))
        rng = np.random.default_rng(params.seed)
        decode, stops = tok.stream_decoder(), StopMatcher(params.stop)
        seq, produced, reason = list(gen.prompt), 0, "length"
        first_token_at = start
        while True:
            if gen.cancelled:
                reason = "cancelled"
                break
            if len(seq) >= model.max_context or (params.max_tokens is not None and produced >= params.max_tokens):
                reason = "length"
                break
            token = pick_token(model.next_logits(seq), params, rng)
            if produced == 0:
                first_token_at = time.perf_counter()
                timings.prompt_ms = (first_token_at - start) * 1000
            if token in tok.end_ids:
                reason = "stop"
                break
            seq.append(token)
            produced += 1
            text, hit_stop = stops.feed(decode(token))
            if text:
                gen._emit(TextDelta(text))
            if hit_stop:
                reason = "stop"
                break
        if not stops.hit and reason != "cancelled":
            tail, _ = stops.feed(decode(None))
            tail += stops.flush()  # a partial stop string at the very end is text after all
            if tail:
                gen._emit(TextDelta(tail))
        timings.predicted_n = produced
        timings.predicted_ms = (time.perf_counter() - first_token_at) * 1000 if produced else 0.0
        return Finished(reason, len(gen.prompt), produced, timings)

