"""Read and check a GGUF file's header before any weight is loaded.

tinygrad's own loader (`tinygrad.llm.gguf`) reads the whole file into a tensor and trusts every length
it finds, so a truncated or corrupt file fails deep inside tinygrad, or asks for terabytes of memory.
This reader walks the header with bounds checks against the file's size, so a bad file fails here with
one clear sentence before the server starts. Format:
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The architectures tinygrad 0.13.0's Transformer runs and that we test: llama covers SmolLM2 and
# Llama 3.x, qwen2/qwen3 the Qwen families.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# ggml tensor types tinygrad can unpack (tinygrad/llm/gguf.py: _GGML_NATIVE and _GGML_QUANT),
# as {type id: (elements per block, bytes per block)}.
TENSOR_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2),
    2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 18: (256, 98), 21: (256, 110), 22: (256, 82), 23: (256, 136), 39: (32, 17), 41: (128, 18),
}

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class ModelFileError(Exception):
    """The model file is missing, unreadable, truncated, corrupt or of an unsupported kind."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost dimension first
    ggml_type: int
    offset: int  # from the start of the data section

    @property
    def nbytes(self) -> int:
        per_block, block_bytes = TENSOR_TYPES[self.ggml_type]
        count = 1
        for dim in self.shape:
            count *= dim
        return count // per_block * block_bytes


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    metadata: dict[str, Any]
    tensors: list[TensorInfo] = field(repr=False)
    data_start: int = 0  # where the tensors' data begins in the file

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    @property
    def context_length(self) -> int:
        return int(self.metadata[f"{self.architecture}.context_length"])

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.metadata.get("general.basename") or self.path.stem)


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise ModelFileError(f"file ends inside {what} at byte {self.pos}: truncated or corrupt")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(out)

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.scalar("<Q", what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelFileError(f"{what} is not valid UTF-8: corrupt file") from e

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            item_type, count = self.scalar("<I", what), self.scalar("<Q", what)
            if count > self.size:  # every item takes at least one byte
                raise ModelFileError(f"{what} claims {count} items, more than the file holds: corrupt file")
            if item_type in _SCALARS:
                fmt = _SCALARS[item_type]
                return list(struct.unpack(f"<{count}{fmt[1]}", self.take(count * struct.calcsize(fmt), what)))
            return [self.value(item_type, what) for _ in range(count)]
        raise ModelFileError(f"{what} has unknown value type {vtype}: corrupt file")


def read_header(path: str | Path) -> GGUFHeader:
    """Parse and check the header of the GGUF file at `path`; raise ModelFileError on any problem."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"model path is not a file: {path}")
    size = path.stat().st_size
    if size < 24:
        raise ModelFileError(f"{path} is too small to be a GGUF file ({size} bytes)")
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, _Cursor(buf, size))
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}") from e


def _parse(path: Path, cur: _Cursor) -> GGUFHeader:
    if cur.take(4, "the magic number") != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (bad magic number)")
    version = cur.scalar("<I", "the version")
    if version not in (2, 3):
        raise ModelFileError(f"{path} is GGUF version {version}; versions 2 and 3 are supported")
    n_tensors, n_kv = cur.scalar("<Q", "the tensor count"), cur.scalar("<Q", "the metadata count")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        metadata[key] = cur.value(cur.scalar("<I", f"the type of {key}"), f"metadata {key!r}")
    tensors = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        n_dims = cur.scalar("<I", f"tensor {name}")
        if n_dims > 8:
            raise ModelFileError(f"tensor {name} claims {n_dims} dimensions: corrupt file")
        shape = tuple(cur.scalar("<Q", f"tensor {name}") for _ in range(n_dims))
        ggml_type, offset = cur.scalar("<I", f"tensor {name}"), cur.scalar("<Q", f"tensor {name}")
        if ggml_type not in TENSOR_TYPES:
            raise ModelFileError(f"tensor {name} uses ggml type {ggml_type}, which tinygrad cannot unpack")
        tensors.append(TensorInfo(name, shape, ggml_type, offset))

    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-cur.pos // alignment) * alignment
    for t in tensors:
        end = data_start + t.offset + t.nbytes
        if end > cur.size:
            raise ModelFileError(
                f"{path} is truncated: tensor {t.name} needs bytes up to {end:,} but the file has {cur.size:,}"
            )

    header = GGUFHeader(path, metadata, tensors, data_start)
    _check_model(header)
    return header


def _check_model(header: GGUFHeader) -> None:
    md = header.metadata
    arch = md.get("general.architecture")
    if arch is None:
        raise ModelFileError(f"{header.path} has no general.architecture: not a model file")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFileError(
            f"{header.path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    for key in (f"{arch}.context_length", f"{arch}.block_count", "tokenizer.ggml.tokens"):
        if key not in md:
            raise ModelFileError(f"{header.path} lacks {key}: incomplete model file")
    model = md.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelFileError(f"{header.path}: tokenizer kind {model!r} is not supported (byte-level BPE, 'gpt2', is)")
    names = {t.name for t in header.tensors}
    if "token_embd.weight" not in names or "blk.0.attn_q.weight" not in names:
        raise ModelFileError(f"{header.path} lacks the embedding or attention weights: incomplete model file")
