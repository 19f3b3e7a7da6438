"""The token embedding kept as the file's Q8_0 blocks, and the weights read through our own maps of the file:
bit for bit the values tinygrad's own GGUF loading gives, so the logits are those of the fp32 embedding."""

from __future__ import annotations

import numpy as np
import pytest
from tinygrad import Device, Tensor, TinyJit, dtypes
from tinygrad.llm.gguf import gguf_load

from tinygrad_backend import weights_file
from tinygrad_backend.cli import resolve_model
from tinygrad_backend.cpu_kernel import compiler_for
from tinygrad_backend.gguf_file import GGUFHeader, read_header
from tinygrad_backend.packed_weights import requantize, requantize_parts
from tinygrad_backend.q8_embedding import Q8_0, Q8Embedding

pytestmark = pytest.mark.skipif(compiler_for(Device.DEFAULT) is None, reason="our kernels run on the CPU only")


@pytest.fixture(scope="module")
def header() -> GGUFHeader:
    return read_header(resolve_model("smollm2")[1])


@pytest.fixture(scope="module")
def tinygrad_embedding(header: GGUFHeader) -> np.ndarray:
    """The embedding as tinygrad's from_gguf held it before: its own dequantization, in fp32."""
    _, state = gguf_load(str(header.path))
    return state["token_embd.weight"].float().numpy()


@pytest.fixture(scope="module")
def embedding(header: GGUFHeader) -> Q8Embedding:
    return Q8Embedding(header, "token_embd.weight", Device.DEFAULT)


def test_the_bundled_model_keeps_a_q8_0_embedding(header: GGUFHeader, embedding: Q8Embedding) -> None:
    info = header.tensor("token_embd.weight")
    assert info is not None and info.ggml_type == Q8_0
    assert embedding.nbytes == info.nbytes  # the file's blocks, 30 MB, not 108 MB of fp32
    assert embedding.nbytes * 3 < embedding.vocab * embedding.dim * 4


def test_dequantized_rows_are_tinygrads_bit_for_bit(embedding: Q8Embedding, tinygrad_embedding: np.ndarray) -> None:
    ours = np.concatenate(list(embedding.row_parts()))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), tinygrad_embedding.view(np.uint32))


def test_the_lookup_kernel_gives_tinygrads_rows_in_a_jit(embedding: Q8Embedding, tinygrad_embedding: np.ndarray) -> None:
    """Looked up by our kernel, captured and replayed by TinyJit as the forward pass is; an id outside the
    vocabulary gives zeros, as tinygrad's one-hot lookup did."""
    vocab = embedding.vocab
    ids = Tensor.zeros(1, 6, dtype=dtypes.int32).contiguous().realize()
    lookup = TinyJit(lambda t: embedding(t).contiguous().realize())
    for values in ([0, 1, 2, 3, 4, 5], [vocab - 1, 17, 4242, 30000, 0, 9], [123, vocab, -1, 49000, 7, 8], [5] * 6):
        ids.assign(Tensor([values], dtype=dtypes.int32)).realize()
        out = lookup(ids).numpy()
        assert out.shape == (1, 6, embedding.dim)
        for row, token in zip(out[0], values, strict=True):
            want = tinygrad_embedding[token] if 0 <= token < vocab else np.zeros(embedding.dim, np.float32)
            np.testing.assert_array_equal(row.view(np.uint32), want.view(np.uint32))


def test_the_tied_output_layer_is_requantized_as_from_the_whole_fp32_table(embedding: Q8Embedding,
                                                                           tinygrad_embedding: np.ndarray) -> None:
    parts, whole = requantize_parts(embedding.row_parts()), requantize(tinygrad_embedding)
    for field in ("q", "scale", "offset"):
        np.testing.assert_array_equal(getattr(parts, field), getattr(whole, field))


def test_tensors_read_through_our_maps_are_tinygrads(header: GGUFHeader) -> None:
    """Every type the bundled file holds (Q4_1 linear layers, F32 norms, the Q8_0 embedding)."""
    _, theirs = gguf_load(str(header.path))
    ours = weights_file.state_dict(header)
    assert ours.keys() == theirs.keys()
    for name in ("blk.0.attn_q.weight", "blk.29.ffn_down.weight", "blk.3.attn_norm.weight", "output_norm.weight",
                 "token_embd.weight"):
        a, b = ours[name].numpy(), theirs[name].numpy()
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
