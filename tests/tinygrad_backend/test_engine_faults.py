"""The engine survives whatever one generation does, and says so when it cannot serve at all.

The faults here (a forward pass that raises, sampling that raises, a step that never returns) cannot
be provoked through the real model on demand, so the engine runs a stand-in model that fails when told
to, with the real tokenizer of a tiny GGUF. The real backend's own hostile-input tests are in
test_hostile_requests.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.tinygrad_backend.tiny_gguf import write_tiny
from tinygrad_backend.engine import Engine, Finished, QueueFull, TextDelta
from tinygrad_backend.gguf_file import read_header
from tinygrad_backend.sampling import SamplingParams
from tinygrad_backend.tokenizer import GGUFTokenizer


class StandIn:
    """A model with the engine's interface: logits that favour token 100, faults on request."""

    def __init__(self, vocab: int, slots: int = 2) -> None:
        self.vocab, self.slots, self.max_context = vocab, slots, 64
        self.fail_feed: set[int] = set()  # first prompt tokens whose prefill raises
        self.fail_step = False
        self.hang = threading.Event()  # set: the next step blocks until `release` is set
        self.release = threading.Event()
        self.forgotten: list[int] = []

    def reusable_prefix(self, tokens: list[int], slot: int = 0) -> int:
        return 0

    def forget(self, slot: int | None = None) -> None:
        self.forgotten.append(-1 if slot is None else slot)

    def _logits(self) -> np.ndarray:
        logits = np.zeros(self.vocab, dtype=np.float32)
        logits[100] = 5.0
        return logits

    def feed(self, tokens: list[int], slot: int = 0, limit: int | None = None) -> np.ndarray | None:
        if tokens[0] in self.fail_feed:
            raise RuntimeError("the prefill kernel failed")
        return self._logits()

    def step(self, sequences: dict[int, list[int]]) -> dict[int, np.ndarray]:
        if self.hang.is_set():
            self.release.wait()
        if self.fail_step:
            raise RuntimeError("the decode kernel failed")
        return {slot: self._logits() for slot in sequences}


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    header = read_header(write_tiny(tmp_path / "tiny.gguf"))
    tok = GGUFTokenizer(header.metadata)
    model = StandIn(tok.vocab_size)
    engine = Engine(lambda: (model, tok), on_fatal=lambda e: None, max_waiting=2, stall_s=0.5)  # type: ignore[arg-type,return-value]
    engine.start()
    assert engine.ready.wait(10)
    yield engine, model
    model.release.set()
    engine.stop()


async def _run(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[str, Finished]:
    gen = engine.submit(prompt, params)
    text = []
    async for event in gen.events():
        if isinstance(event, TextDelta):
            text.append(event.text)
        else:
            return "".join(text), event
    raise AssertionError("no Finished event")


def run(engine: Engine, prompt: list[int], **params: Any) -> tuple[str, Finished]:
    return asyncio.run(asyncio.wait_for(_run(engine, prompt, SamplingParams(**params)), 10))


def test_a_seed_the_generator_refuses_fails_that_request_alone(engine: Any) -> None:
    e, _ = engine
    _, done = run(e, [5, 6], seed=-1, max_tokens=3)  # what the APIs refuse with 400, reaching the engine anyway
    assert done.reason == "error" and "ValueError" in (done.error or "")
    text, done = run(e, [5, 6], temperature=0, max_tokens=3)
    assert done.reason == "length" and done.completion_tokens == 3 and text
    assert e.problem() is None


def test_sampling_that_fails_fails_that_request_alone(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import tinygrad_backend.engine as engine_module

    e, _ = engine
    real = engine_module.pick_token

    def pick(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, *rest: Any) -> int:
        if params.top_p == 0.5:
            raise FloatingPointError("Probabilities contain NaN")
        return real(logits, params, rng, *rest)

    monkeypatch.setattr(engine_module, "pick_token", pick)

    async def both() -> list[tuple[str, Finished]]:
        return list(await asyncio.gather(_run(e, [5], SamplingParams(top_p=0.5, max_tokens=4, seed=7)),
                                         _run(e, [7], SamplingParams(temperature=0, max_tokens=4))))

    (_, bad), (good_text, good) = asyncio.run(asyncio.wait_for(both(), 10))
    assert bad.reason == "error" and "NaN" in (bad.error or "")
    assert good.reason == "length" and good.completion_tokens == 4 and good_text


def test_a_failed_prefill_fails_that_prompt_and_forgets_its_slot(engine: Any) -> None:
    e, model = engine
    model.fail_feed.add(9)
    _, done = run(e, [9, 1], max_tokens=2)
    assert done.reason == "error" and "prefill" in (done.error or "")
    assert model.forgotten  # its KV cache row is treated as empty
    _, done = run(e, [5, 1], temperature=0, max_tokens=2)
    assert done.reason == "length"


def test_a_failed_decode_step_fails_its_generations_and_the_engine_goes_on(engine: Any) -> None:
    e, model = engine
    model.fail_step = True
    _, done = run(e, [5], max_tokens=3)
    assert done.reason == "error" and "decode" in (done.error or "")
    model.fail_step = False
    _, done = run(e, [5], temperature=0, max_tokens=3)
    assert done.reason == "length" and done.completion_tokens == 3


def test_a_stuck_engine_is_reported_and_a_full_queue_refused(engine: Any) -> None:
    e, model = engine
    model.hang.set()

    async def stuck() -> None:
        gens = [e.submit([5], SamplingParams(max_tokens=5, temperature=0))]
        while not e.running:  # admitted, prefilled, then stuck in its first decode step
            await asyncio.sleep(0.01)
        gens += [e.submit([5], SamplingParams(max_tokens=5, temperature=0)) for _ in range(e.max_waiting)]
        assert e.waiting == e.max_waiting
        with pytest.raises(QueueFull):
            e.submit([5], SamplingParams(max_tokens=5, temperature=0))
        deadline = time.monotonic() + 5
        while e.problem() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "no progress" in (e.problem() or "")
        model.release.set()  # unstuck: everything finishes, and the report clears
        for gen in gens:
            async for event in gen.events():
                if isinstance(event, Finished):
                    assert event.reason == "length"
        assert e.problem() is None

    asyncio.run(asyncio.wait_for(stuck(), 20))


def test_an_idle_engine_is_not_stuck(engine: Any) -> None:
    e, _ = engine
    time.sleep(0.8)  # longer than stall_s with nothing to do
    assert e.problem() is None
    _, done = run(e, [5], temperature=0, max_tokens=1)
    assert done.reason == "length" and e.problem() is None


def test_a_dead_engine_thread_is_reported_and_fails_what_it_held(engine: Any) -> None:
    e, model = engine

    def die(sequences: dict[int, list[int]]) -> dict[int, np.ndarray]:
        raise SystemExit("the thread is gone")  # not an Exception: nothing per request catches it

    model.step = die  # type: ignore[method-assign]
    _, done = run(e, [5], max_tokens=3)
    assert done.reason == "error" and "engine stopped" in (done.error or "")
    e._thread.join(5)
    assert "engine thread has stopped" in (e.problem() or "") and "SystemExit" in (e.problem() or "")
