"""Packed weights and our CPU kernel: the same numbers as the plain product, for every option and shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tinygrad import Tensor, nn
from tinygrad.llm.gguf import gguf_load

from tinygrad_backend import packed_weights
from tinygrad_backend.cli import resolve_model
from tinygrad_backend.gguf_file import read_header
from tinygrad_backend.packed_weights import BLOCK, Packed, PackedLinear, from_file, requantize

RNG = np.random.default_rng(7)


def four_bit(rows: int, cols: int) -> Packed:
    return Packed(4, RNG.integers(0, 256, (rows, cols // 2), dtype=np.uint8),
                  (RNG.random((rows, cols // BLOCK)) * 0.02).astype(np.float32),
                  (RNG.random((rows, cols // BLOCK)) * -0.15).astype(np.float32))


def eight_bit(rows: int, cols: int) -> Packed:
    return requantize(RNG.standard_normal((rows, cols)).astype(np.float32))


# the kernel's 4-bit products use integer dot products where clang targets AVX-512 VNNI (-march=native)
FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
INTEGER_DOTS = packed_weights.INTEGER_DOTS and {"avx512_vnni", "avx512bw"} <= FLAGS


def quantized_x(x: np.ndarray) -> np.ndarray:
    """x as the integer path sees it: int16 per block of 32, scale max|x| / 32767, rounded half away from zero."""
    blocks = x.reshape(x.shape[0], -1, BLOCK)
    top = np.abs(blocks).max(-1, keepdims=True)
    scaled = blocks * np.where(top > 0, np.float32(32767) / np.where(top > 0, top, 1), 0).astype(np.float32)
    steps = np.trunc(scaled + np.where(scaled >= 0, 0.5, -0.5))
    return (steps * (top / 32767)).reshape(x.shape)


def reference(x: np.ndarray, packed: Packed, norm: np.ndarray | None, residual: np.ndarray | None, glu: bool,
              integer_dots: bool = INTEGER_DOTS) -> np.ndarray:
    if norm is not None:
        x = (x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * norm).astype(np.float32)
    weight = packed.dequantize()
    if packed.bits == 4 and integer_dots and weight.shape[1] // BLOCK % 2 == 0:  # it takes blocks in pairs
        # the offsets multiply the sums of x itself; only the steps meet the quantized x
        offsets = np.repeat(packed.offset, BLOCK, axis=1)
        out = quantized_x(x) @ (weight - offsets).T + x @ offsets.T
    else:
        out = x @ weight.T
    if glu:
        gate, up = np.split(out, 2, axis=-1)
        out = gate / (1 + np.exp(-gate)) * up
    return out if residual is None else out + residual


def test_requantized_blocks_stay_within_half_a_step_of_the_weights() -> None:
    weight = RNG.standard_normal((8, 128)).astype(np.float32)
    weight[0, :BLOCK] = 0.25  # a constant block: zero range, must come back exactly
    packed = requantize(weight)
    assert packed.bits == 8 and packed.q.dtype == np.int8
    step = (weight.reshape(8, -1, BLOCK).max(-1) - weight.reshape(8, -1, BLOCK).min(-1)) / 255
    error = np.abs(packed.dequantize() - weight).reshape(8, -1, BLOCK).max(-1)
    assert np.all(error <= step / 2 + 1e-6)
    np.testing.assert_array_equal(packed.dequantize()[0, :BLOCK], weight[0, :BLOCK])


@pytest.mark.parametrize("make", [four_bit, eight_bit], ids=["4-bit", "8-bit"])
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 10, 32])
@pytest.mark.parametrize("options", ["plain", "norm", "residual", "norm+glu", "norm+glu+residual"])
@pytest.mark.parametrize("features", [96, 128])  # 3 blocks a row: the float path; 4: integer dots, where available
def test_kernel_gives_the_plain_product(make, rows: int, options: str, features: int) -> None:  # type: ignore[no-untyped-def]
    """Decode shapes (a row of x per slot: up to 8 convert each block as used) and prompt chunks (more: a
    dequantized weight row for four rows of x at a time, and the remainder)."""
    glu = "glu" in options
    packed = make(2 * 40 if glu else 40, features)
    layer = PackedLinear(packed, "CPU")
    assert layer._compiler is not None, "the CPU device here compiles with clang: the kernel must be the one under test"
    out_features = 40
    x = RNG.standard_normal((rows, features)).astype(np.float32)
    norm = nn.RMSNorm(features, 1e-5)
    norm_weight = RNG.random(features).astype(np.float32) + 0.5
    norm.weight = Tensor(norm_weight)
    residual = RNG.standard_normal((rows, out_features)).astype(np.float32)
    got = layer(Tensor(x), norm=norm if "norm" in options else None,
                residual=Tensor(residual) if "residual" in options else None, glu=glu).numpy()
    want = reference(x, packed, norm_weight if "norm" in options else None,
                     residual if "residual" in options else None, glu)
    assert got.shape == (rows, out_features)
    np.testing.assert_allclose(got, want, rtol=5e-4, atol=5e-4)


@pytest.mark.parametrize("make", [four_bit, eight_bit], ids=["4-bit", "8-bit"])
def test_plain_tinygrad_path_for_other_devices_gives_the_plain_product(make) -> None:  # type: ignore[no-untyped-def]
    packed = make(64, 64)
    plain = PackedLinear(packed, "CPU")
    plain._compiler = None  # as on a GPU: dequantize inside tinygrad's own matmul
    x = RNG.standard_normal((2, 1, 64)).astype(np.float32)
    for glu in (False, True):
        want = reference(x.reshape(2, 64), packed, None, None, glu, integer_dots=False)
        np.testing.assert_allclose(plain(Tensor(x), glu=glu).numpy().reshape(2, -1), want, rtol=1e-4, atol=1e-4)


def test_four_bit_blocks_come_from_the_file_exactly() -> None:
    """The bundled model's Q4_1 blocks are taken as they are: they reproduce tinygrad's own dequantized
    weights bit for bit; a weight they do not reproduce is refused (and then requantized by the caller)."""
    path = resolve_model("smollm2")[1]
    header = read_header(path)
    _, state = gguf_load(str(path))
    loaded = state["blk.0.ffn_gate.weight"].float().numpy()
    packed = from_file(header, "blk.0.ffn_gate.weight", loaded)
    assert packed is not None and packed.bits == 4
    assert packed.q.nbytes + packed.scale.nbytes + packed.offset.nbytes == loaded.size * 3 // 4
    np.testing.assert_array_equal(packed.dequantize(), loaded)
    assert from_file(header, "blk.0.ffn_gate.weight", loaded * 2) is None
    assert from_file(header, "token_embd.weight", loaded) is None  # Q8_0: not a 4-bit type
