"""The token embedding kept as the GGUF file's Q8_0 blocks, dequantized only for the rows a step looks up.

Kept in fp32 the embedding of SmolLM2-135M is 108 MB (49152 x 576 x 4 bytes); as the file's Q8_0 blocks
(per 32 values an fp16 scale d and 32 int8 steps q) it is 30 MB. A lookup is one C kernel of ours
(kernels/embedding_q8.c, run inside tinygrad's graph like our other kernels, cpu_kernel.py) computing
d * q in fp32 for each looked-up row: the arithmetic of tinygrad's own GGUF dequantization
(tinygrad.llm.gguf.ggml_data_to_tensor, type 8: fp16 -> fp32 scale times the int8 step), so the rows are
bit for bit the fp32 weights the embedding held before (tests/tinygrad_backend/test_q8_embedding.py).
Only where our kernels run (the CPU); elsewhere the embedding stays tinygrad's fp32 nn.Embedding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from tinygrad import Tensor, dtypes, nn
from tinygrad.device import Buffer
from tinygrad.renderer import Estimates

from tinygrad_backend.cpu_kernel import DeviceName, compile_kernel, compiler_for, kernel_text, run
from tinygrad_backend.gguf_file import GGUFHeader

Q8_0 = 8  # ggml type id
BLOCK, BLOCK_BYTES = 32, 34  # values per block; bytes per block (fp16 scale, 32 int8 steps)
READ_CHUNK = 8 << 20  # bytes read from the file at a time


class Q8Embedding:
    """Callable like tinygrad's nn.Embedding: token ids (..., ) int32 -> (..., dim) fp32."""

    def __init__(self, header: GGUFHeader, name: str, device: DeviceName) -> None:
        info = header.tensor(name)
        assert info is not None and info.ggml_type == Q8_0 and len(info.shape) == 2
        self.dim, self.vocab = info.shape
        assert self.dim % BLOCK == 0
        self.device = device
        compiler = compiler_for(device)
        assert compiler is not None, "our lookup kernel runs on the CPU only"
        self._compiler = compiler
        nbytes = self.vocab * self.dim // BLOCK * BLOCK_BYTES
        self.blocks = Tensor.empty(self.vocab, self.dim // BLOCK * BLOCK_BYTES, dtype=dtypes.uint8, device=device)
        buffer = self.blocks.uop.buffer
        assert isinstance(buffer, Buffer), "one device only"
        buffer.allocate()
        # read straight into the device buffer (the CPU allocator's own memory): no copy of the file in between
        view = buffer.as_memoryview(allow_zero_copy=True)
        with header.path.open("rb") as f:
            f.seek(header.data_start + info.offset)
            for start in range(0, nbytes, READ_CHUNK):
                end = min(nbytes, start + READ_CHUNK)
                if f.readinto(view[start:end]) != end - start:
                    raise OSError(f"{header.path}: short read of {name}")
        self._host = np.frombuffer(view, dtype=np.uint8).reshape(self.vocab, -1)  # the same memory, read only here

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes())

    def dequantize(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Rows start:end as fp32, (rows, dim): scale * step, one fp32 product as tinygrad's dequantization."""
        raw = self._host[start:end].reshape(-1, self.dim // BLOCK, BLOCK_BYTES)
        scale = raw[..., :2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
        steps = raw[..., 2:].view(np.int8).astype(np.float32)
        return (scale * steps).reshape(-1, self.dim)

    def row_parts(self, rows: int = 4096) -> Iterator[np.ndarray]:
        """The whole table as fp32, `rows` rows at a time (never all of it at once)."""
        for start in range(0, self.vocab, rows):
            yield self.dequantize(start, start + rows)

    def __call__(self, tokens: Tensor) -> Tensor:
        lead = tokens.shape
        count = math.prod(int(n) for n in lead)
        name = f"embedding_q8_{count}_{self.vocab}_{self.dim}"
        kernel = compile_kernel(self._compiler, name, kernel_text(
            "embedding_q8.c", name, {"ROWS": count, "VOCAB": self.vocab, "DIM": self.dim}), 1)
        read = count * (self.dim // BLOCK * BLOCK_BYTES + 4)
        estimates = Estimates(ops=count * self.dim, lds=read, mem=read + 4 * count * self.dim)
        out = Tensor.empty(count, self.dim, dtype=dtypes.float, device=tokens.device)
        ids = tokens.reshape(count)
        if ids.dtype != dtypes.int32:
            ids = ids.cast(dtypes.int32)
        return run(kernel, out, [ids, self.blocks], estimates).reshape(*lead, self.dim)


def embedding_device(embedding: nn.Embedding | Q8Embedding) -> DeviceName:
    """Where a model's token embedding (tinygrad's or ours) lives."""
    return embedding.device if isinstance(embedding, Q8Embedding) else embedding.weight.device
