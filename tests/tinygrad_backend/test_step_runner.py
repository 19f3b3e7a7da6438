"""Our step runner (tinygrad_backend/step_runner.py) replays a captured JIT exactly as tinygrad's CPU queue does,
keeps tinygrad's replay where it cannot, and can be turned off.

Exactness is bit for bit: the runner calls the very kernels tinygrad compiled, on the very buffers, in the
order tinygrad captured them, so any difference is a bug (a wrong address, a missed per-call value, a share
of a threaded kernel run twice or not at all).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tinygrad import GlobalCounters, Tensor, TinyJit, UOp

from tests.tinygrad_backend.tiny_gguf import write_tiny
from tinygrad_backend import step_runner
from tinygrad_backend.cli import resolve_model
from tinygrad_backend.gguf_file import read_header
from tinygrad_backend.model import InputBuffer, Model
from tinygrad_backend.step_runner import ENV, TIMING, Replay

ROWS = 512  # big enough for tinygrad to split its kernels over two threads (core_id)


def _jit() -> tuple[TinyJit, InputBuffer, InputBuffer, UOp]:
    x, y = InputBuffer(ROWS, ROWS, "CPU"), InputBuffer(1, ROWS, "CPU")
    column = UOp.variable("column", 0, ROWS - 1)

    def f(a: Tensor, b: Tensor, c: UOp) -> Tensor:
        z = (a.float() * 2 + b.float()).contiguous()
        return (z.sum(axis=1) + a[:, c].float()).contiguous()  # a kernel that takes `column` per call

    return TinyJit(f), x, y, column


def _calls(replay: Replay, jit: TinyJit, x: InputBuffer, y: InputBuffer, column: UOp, n: int = 6,
           counted: list[tuple[int, int, int]] | None = None) -> list[np.ndarray]:
    """n calls with random inputs, each checked against numpy; `counted` gets what each adds to GlobalCounters."""
    rng = np.random.default_rng(1)
    got = []
    for _ in range(n):
        a, b, c = rng.integers(-100, 100, (ROWS, ROWS)), rng.integers(-100, 100, (1, ROWS)), int(rng.integers(0, ROWS))
        ta, tb = x.write(a), y.write(b)
        GlobalCounters.reset()
        out = replay(lambda ta=ta, tb=tb, c=c: jit(ta, tb, column.bind(c)).realize(), column=c)
        if counted is not None:
            counted.append((GlobalCounters.kernel_count, GlobalCounters.global_ops, GlobalCounters.global_mem))
        got.append(out.numpy())
        np.testing.assert_array_equal(got[-1], (a * 2 + b).sum(1) + a[:, c])  # small integers: exact in floats
    return got


def test_a_jit_replayed_by_the_runner_gives_what_tinygrads_replay_gives() -> None:
    jit, x, y, column = _jit()
    replay = Replay(jit, (x.tensor, y.tensor), ("column",))
    counted_ours: list[tuple[int, int, int]] = []
    ours = _calls(replay, jit, x, y, column, counted=counted_ours)
    assert replay.plan is not None, replay.fallback
    assert max(int(t) for t in replay.plan.kernels["threads"]) > 1  # the pool's threads took part
    assert len(replay.plan.patches) == 1  # `column`, patched into its kernel on every call
    replay.use = False
    counted_theirs: list[tuple[int, int, int]] = []
    theirs = _calls(replay, jit, x, y, column, counted=counted_theirs)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)
    # the replays (calls 3 on) count in tinygrad's GlobalCounters as tinygrad's own do
    assert counted_ours[2:] == counted_theirs[2:] and counted_ours[2][2] > 0


def test_the_runner_times_its_kernels_when_asked() -> None:
    jit, x, y, column = _jit()
    replay = Replay(jit, (x.tensor, y.tensor), ("column",))
    _calls(replay, jit, x, y, column, n=3)
    assert replay.plan is not None
    TIMING.on = True
    try:
        TIMING.take()
        replay.plan(column=3)
        seconds = TIMING.take()
    finally:
        TIMING.on = False
    times = replay.plan.kernel_times()
    assert seconds > 0 and len(times) == len(replay.plan.kernels)
    assert sum(t for _, t in times) == pytest.approx(seconds)


def test_inputs_that_are_not_the_captured_buffers_keep_tinygrads_replay() -> None:
    jit, x, y, column = _jit()
    other = InputBuffer(ROWS, ROWS, "CPU")
    replay = Replay(jit, (other.tensor, y.tensor), ("column",))
    _calls(replay, jit, x, y, column, n=4)  # still right: tinygrad replays it
    assert replay.plan is None and replay.fallback is not None and "not the one the JIT captured" in replay.fallback


def test_a_variable_the_caller_does_not_give_keeps_tinygrads_replay() -> None:
    jit, x, y, column = _jit()
    replay = Replay(jit, (x.tensor, y.tensor), ())
    _calls(replay, jit, x, y, column, n=4)
    assert replay.plan is None and replay.fallback is not None and "column" in replay.fallback


def test_a_value_outside_its_variable_is_refused() -> None:
    jit, x, y, column = _jit()
    replay = Replay(jit, (x.tensor, y.tensor), ("column",))
    _calls(replay, jit, x, y, column, n=3)
    assert replay.plan is not None
    with pytest.raises(ValueError, match="column"):
        replay.plan(column=ROWS)


def _feeds(model: Model) -> list[np.ndarray]:
    """Logits through every JIT: a prompt in chunks (the last padded), tokens one at a time, every slot at once."""
    rng = np.random.default_rng(0)
    model.forget()
    seqs = {slot: [int(t) for t in rng.integers(3, 200, 40 + 5 * slot)] for slot in range(model.slots)}
    out = [model.next_logits(seq, slot) for slot, seq in seqs.items()]
    for k in range(3):
        seqs[0].append(7 + k)
        out.append(model.next_logits(seqs[0], 0))
    for k in range(3):
        for seq in seqs.values():
            seq.append(11 + k)
        out.extend(model.step(seqs).values())
    return out


def _same_with_and_without(model: Model) -> None:
    ours = _feeds(model)
    assert all(r.plan is not None for r in model.replays.values()), model.replay_summary()
    for r in model.replays.values():
        r.use = False
    theirs = _feeds(model)
    for r in model.replays.values():
        r.use = True
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_give_the_same_logits_with_and_without_the_runner(tmp_path: Path, arch: str) -> None:
    model = Model(read_header(write_tiny(tmp_path / f"{arch}.gguf", arch)), 64, progress=lambda _: None, slots=3)
    model.warm_up(progress=lambda _: None)
    _same_with_and_without(model)


def test_the_bundled_model_gives_the_same_logits_with_and_without_the_runner() -> None:
    """Packed weights, our attention kernel, the output layer on two threads."""
    model = Model(read_header(resolve_model("smollm2")[1]), 128, progress=lambda _: None, slots=2)
    lines: list[str] = []
    model.warm_up(progress=lines.append)
    assert "chunk: step runner" in lines[-1] and "every: step runner" in lines[-1], lines
    _same_with_and_without(model)


def test_the_environment_turns_the_runner_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "0")
    assert not step_runner.enabled()
    model = Model(read_header(write_tiny(tmp_path / "tiny.gguf")), 64, progress=lambda _: None, slots=2)
    lines: list[str] = []
    model.warm_up(progress=lines.append)
    assert all(r.plan is None for r in model.replays.values())
    assert f"tinygrad ({ENV}=0)" in lines[-1]
    off = _feeds(model)
    monkeypatch.delenv(ENV)
    assert step_runner.enabled()
    model = Model(read_header(write_tiny(tmp_path / "tiny.gguf")), 64, progress=lambda _: None, slots=2)
    model.warm_up(progress=lambda _: None)
    for a, b in zip(_feeds(model), off, strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(r.plan is not None for r in model.replays.values())
