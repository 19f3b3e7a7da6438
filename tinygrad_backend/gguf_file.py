"""Read and check a GGUF file's header before any weight is loaded.

tinygrad's own loader (`tinygrad.llm.gguf`) reads the whole file into a tensor and trusts every length
it finds, so a truncated or corrupt file fails deep inside tinygrad, or asks for terabytes of memory.
This reader walks the header with bounds checks against the file's size, so a bad file fails here with
one clear sentence before the server starts. It is written for hostile input: every count and length is
checked against what the rest of the file can hold before anything is allocated, and every metadata
value that the server, its tokenizer or tinygrad reads is checked for its type and range. Format:
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import math
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
# the fewest bytes a value of each type takes: a string is at least its 8-byte length, an array its
# 4-byte item type and 8-byte count
_MIN_BYTES = {t: struct.calcsize(f) for t, f in _SCALARS.items()} | {_STRING: 8, _ARRAY: 12}
_U64 = struct.Struct("<Q")
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dimension, type, offset

MAX_DIMS = 4  # GGML_MAX_DIMS
# An array may hold arrays, which may hold arrays, no deeper (llama.cpp accepts no nesting at all; the
# format allows any): a deeper one is no model's metadata, and reading it recursively would overflow the stack.
MAX_ARRAY_DEPTH = 3
# All metadata arrays together. A 256k-token vocabulary with its merges, types and scores is ~1M items;
# an array item takes as little as 1 byte of the file but ~8-60 bytes once it is a Python object, so
# this bounds what a hostile file can make us allocate.
MAX_ARRAY_ITEMS = 1 << 24
_MAX_ELEMENTS = 1 << 62  # ggml counts elements in an int64


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
        return math.prod(self.shape) // per_block * block_bytes


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
        self.array_items = 0  # read so far, in all arrays

    @property
    def left(self) -> int:
        return self.size - self.pos

    def _ends(self, what: str) -> ModelFileError:
        return ModelFileError(f"the file ends inside {what} at byte {self.pos:,}: truncated or corrupt")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.size - self.pos:
            raise self._ends(what)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(out)

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        # the hot path (a vocabulary is ~100k strings): one bounds check for the length, one for the bytes,
        # both before anything is copied
        pos, buf = self.pos, self.buf
        if pos + 8 > self.size:
            raise self._ends(what)
        n = _U64.unpack_from(buf, pos)[0]
        if n > self.size - pos - 8:
            raise self._ends(what)
        self.pos = end = pos + 8 + n
        try:
            return str(buf[pos + 8 : end], "utf-8")
        except UnicodeDecodeError as e:
            raise ModelFileError(f"{what} is not valid UTF-8: corrupt file") from e

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise ModelFileError(f"{what} has unknown value type {vtype}: corrupt file")
        item_type, count = self.scalar("<I", what), self.scalar("<Q", what)
        if item_type not in _MIN_BYTES:
            raise ModelFileError(f"{what} is an array of unknown value type {item_type}: corrupt file")
        if item_type == _ARRAY and depth + 1 >= MAX_ARRAY_DEPTH:
            raise ModelFileError(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep: corrupt file")
        if count * _MIN_BYTES[item_type] > self.left:
            raise ModelFileError(f"{what} claims {count:,} items, more than the rest of the file holds: "
                                 f"truncated or corrupt")
        self.array_items += count
        if self.array_items > MAX_ARRAY_ITEMS:
            raise ModelFileError(f"the metadata holds more than {MAX_ARRAY_ITEMS:,} array items, far more than any "
                                 f"model's, at {what}: corrupt file")
        if item_type in _SCALARS:
            fmt = _SCALARS[item_type]
            return list(struct.unpack(f"<{count}{fmt[1]}", self.take(count * _MIN_BYTES[item_type], what)))
        if item_type == _STRING:
            return [self.string(what) for _ in range(count)]
        return [self.value(item_type, what, depth + 1) for _ in range(count)]


def read_header(path: str | Path) -> GGUFHeader:
    """Parse and check the header of the GGUF file at `path`; raise ModelFileError on any problem."""
    path = Path(path)
    try:
        if not path.exists():
            raise ModelFileError(f"model file not found: {path}")
        if not path.is_file():
            raise ModelFileError(f"model path is not a file: {path}")
        size = path.stat().st_size
        if size < 24:
            raise ModelFileError(f"{path} is too small to be a GGUF file ({size} bytes)")
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse(path, _Cursor(buf, size))
            except ModelFileError as e:
                raise ModelFileError(f"{path}: {e}") from None
    except OSError as e:  # also a path the OS refuses to look up (too long, no permission)
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}") from e


def _parse(path: Path, cur: _Cursor) -> GGUFHeader:
    if cur.take(4, "the magic number") != b"GGUF":
        raise ModelFileError("not a GGUF file (bad magic number)")
    version = cur.scalar("<I", "the version")
    if version not in (2, 3):
        swapped = " (a big-endian file?)" if version and version & 0xFFFF == 0 else ""
        raise ModelFileError(f"GGUF version {version}{swapped} is not supported (versions 2 and 3 are)")
    n_tensors, n_kv = cur.scalar("<Q", "the tensor count"), cur.scalar("<Q", "the metadata count")
    if n_kv * _MIN_KV_BYTES > cur.left:
        raise ModelFileError(f"the header claims {n_kv:,} metadata entries, more than the file holds: "
                             f"truncated or corrupt")
    if n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left:
        raise ModelFileError(f"the header claims {n_tensors:,} tensors, more than the file holds: "
                             f"truncated or corrupt")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        if key in metadata:
            raise ModelFileError(f"metadata key {_show(key)} appears twice: corrupt file")
        metadata[key] = cur.value(cur.scalar("<I", f"the type of {_show(key)}"), f"metadata {_show(key)}")

    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        shown = _show(name)
        if name in names:
            raise ModelFileError(f"tensor {shown} appears twice: corrupt file")
        names.add(name)
        n_dims = cur.scalar("<I", f"tensor {shown}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelFileError(f"tensor {shown} claims {n_dims} dimensions (ggml has 1 to {MAX_DIMS}): corrupt file")
        shape = tuple(cur.scalar("<Q", f"tensor {shown}") for _ in range(n_dims))
        ggml_type, offset = cur.scalar("<I", f"tensor {shown}"), cur.scalar("<Q", f"tensor {shown}")
        if ggml_type not in TENSOR_TYPES:
            raise ModelFileError(f"tensor {shown} uses ggml type {ggml_type}, which tinygrad cannot unpack")
        if 0 in shape or math.prod(shape) > _MAX_ELEMENTS:
            raise ModelFileError(f"tensor {shown} has the impossible shape {list(shape)}: corrupt file")
        per_block = TENSOR_TYPES[ggml_type][0]
        if shape[0] % per_block:
            raise ModelFileError(f"tensor {shown} has rows of {shape[0]} values, not a whole number of its type's "
                                 f"blocks of {per_block}: corrupt file")
        tensors.append(TensorInfo(name, shape, ggml_type, offset))

    alignment = metadata.get("general.alignment", 32)
    if not _is_int(alignment) or alignment < 1 or alignment & (alignment - 1):
        raise ModelFileError(f"general.alignment is {_show(alignment)}, not a power of two: corrupt file")
    data_start = -(-cur.pos // alignment) * alignment
    if data_start > cur.size:
        raise ModelFileError(f"the tensor data would start at byte {data_start:,}, past the end of the file "
                             f"({cur.size:,} bytes): truncated or corrupt")
    for t in tensors:
        if t.offset % alignment:
            raise ModelFileError(f"tensor {_show(t.name)} starts at offset {t.offset:,}, which is not a multiple of the "
                                 f"alignment {alignment}: corrupt file")
        if t.nbytes > cur.size:
            raise ModelFileError(f"tensor {_show(t.name)} of shape {list(t.shape)} needs {t.nbytes:,} bytes, more than the "
                                 f"whole file ({cur.size:,} bytes): truncated or corrupt")
        end = data_start + t.offset + t.nbytes
        if end > cur.size:
            raise ModelFileError(f"truncated: tensor {_show(t.name)} needs bytes up to {end:,} but the file has {cur.size:,}")
    by_offset = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(by_offset, by_offset[1:], strict=False):
        if b.offset < a.offset + a.nbytes:
            raise ModelFileError(f"the data of tensors {_show(a.name)} and {_show(b.name)} overlap: corrupt file")

    header = GGUFHeader(path, metadata, tensors, data_start)
    _check_model(header)
    return header


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """A metadata value, short, on one line, for a message."""
    if isinstance(value, list):
        kind = f" {type(value[0]).__name__}" if value else ""
        return f"an array of {len(value):,}{kind} items"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(md: dict[str, Any], key: str, minimum: int = 1, required: bool = True) -> int | None:
    value = md.get(key)
    if value is None:
        if required:
            raise ModelFileError(f"lacks {key}: incomplete model file")
        return None
    if not _is_int(value) or value < minimum:
        raise ModelFileError(f"{key} is {_show(value)}; it must be an integer of at least {minimum}")
    return int(value)


def _number(md: dict[str, Any], key: str, positive: bool) -> None:
    value = md.get(key)
    if value is None:
        raise ModelFileError(f"lacks {key}: incomplete model file")
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0 \
            or (positive and value == 0):
        raise ModelFileError(f"{key} is {_show(value)}; it must be a {'positive' if positive else 'non-negative'} number")


def _array(md: dict[str, Any], key: str, kind: type, what: str) -> list[Any] | None:
    value = md.get(key)
    if value is None:
        return None
    # a GGUF array has one item type, so its first item tells the type of all
    if not isinstance(value, list) or (value and (type(value[0]) is not kind)):
        raise ModelFileError(f"{key} is {_show(value)}, not an array of {what}")
    return value


def _shape(header: GGUFHeader, name: str, want: tuple[int, ...]) -> None:
    tensor = header.tensor(name)
    if tensor is not None and tensor.shape != want:
        raise ModelFileError(f"tensor {name} has shape {list(tensor.shape)} where the metadata implies {list(want)}: "
                             f"inconsistent model file")


def _check_model(header: GGUFHeader) -> None:
    """Check every value that the server, its tokenizer and tinygrad's Transformer.from_gguf read."""
    md = header.metadata
    arch = md.get("general.architecture")
    if arch is None:
        raise ModelFileError("has no general.architecture: not a model file")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFileError(
            f"architecture {_show(arch)} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    splits = md.get("split.count", 1)
    if splits != 1:
        raise ModelFileError(f"split.count is {_show(splits)}: a model split over several files is not supported "
                             f"(merge it with llama-gguf-split --merge)")
    _int(md, f"{arch}.context_length")
    blocks = _int(md, f"{arch}.block_count")
    assert blocks is not None
    dim = _int(md, f"{arch}.embedding_length")
    heads = _int(md, f"{arch}.attention.head_count")
    kv_heads = _int(md, f"{arch}.attention.head_count_kv")
    assert dim is not None and heads is not None and kv_heads is not None
    if heads % kv_heads:
        raise ModelFileError(f"{arch}.attention.head_count ({heads}) is not a multiple of head_count_kv ({kv_heads})")
    head_dim = _int(md, f"{arch}.attention.key_length", required=False) or dim // heads
    _int(md, f"{arch}.attention.value_length", required=False)
    _int(md, f"{arch}.feed_forward_length", required=False)
    rope_dim = _int(md, f"{arch}.rope.dimension_count", required=False)
    if rope_dim is not None and (rope_dim > head_dim or rope_dim % 2):
        raise ModelFileError(f"{arch}.rope.dimension_count is {rope_dim}; it must be even and at most the head "
                             f"size {head_dim}")
    _number(md, f"{arch}.rope.freq_base", positive=True)
    _number(md, f"{arch}.attention.layer_norm_rms_epsilon", positive=False)

    if md.get("tokenizer.ggml.model") != "gpt2":
        raise ModelFileError(f"tokenizer kind {_show(md.get('tokenizer.ggml.model'))} is not supported "
                             f"(byte-level BPE, 'gpt2', is)")
    tokens = _array(md, "tokenizer.ggml.tokens", str, "strings")
    if not tokens:
        raise ModelFileError("lacks tokenizer.ggml.tokens: incomplete model file")
    types = _array(md, "tokenizer.ggml.token_type", int, "integers")
    if types is not None and len(types) != len(tokens):
        raise ModelFileError(f"tokenizer.ggml.token_type has {len(types):,} entries for {len(tokens):,} tokens")
    merges = _array(md, "tokenizer.ggml.merges", str, "strings")
    if merges:
        _check_merges(merges, tokens)
    pre = md.get("tokenizer.ggml.pre")
    if pre is not None and not isinstance(pre, str):
        raise ModelFileError(f"tokenizer.ggml.pre is {_show(pre)}, not a string")
    for key in ("bos", "eos", "eot", "eom"):
        _int(md, f"tokenizer.ggml.{key}_token_id", minimum=0, required=False)
        token_id = md.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and token_id >= len(tokens):
            raise ModelFileError(f"tokenizer.ggml.{key}_token_id is {token_id}, past the {len(tokens):,} tokens")
    if not isinstance(md.get("tokenizer.ggml.add_bos_token", False), bool):
        raise ModelFileError(f"tokenizer.ggml.add_bos_token is {_show(md['tokenizer.ggml.add_bos_token'])}, not a boolean")
    template = md.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ModelFileError(f"tokenizer.chat_template is {_show(template)}, not a string")

    names = {t.name for t in header.tensors}
    if "token_embd.weight" not in names or "blk.0.attn_q.weight" not in names:
        raise ModelFileError("lacks the embedding or attention weights: incomplete model file")
    if blocks > len(names):
        raise ModelFileError(f"{arch}.block_count is {blocks:,}, more blocks than the file has tensors")
    missing = next((i for i in range(blocks) if f"blk.{i}.attn_q.weight" not in names), None)
    if missing is not None:
        raise ModelFileError(f"{arch}.block_count is {blocks} but block {missing} has no attention weights: "
                             f"incomplete model file")
    # the shapes llama.cpp requires (llama-model.cpp: create_tensor), which bound every size tinygrad allocates
    _shape(header, "token_embd.weight", (dim, len(tokens)))
    _shape(header, "output.weight", (dim, len(tokens)))
    _shape(header, "blk.0.attn_q.weight", (dim, heads * head_dim))
    _shape(header, "blk.0.attn_k.weight", (dim, kv_heads * head_dim))


def _check_merges(merges: list[str], tokens: list[str]) -> None:
    # the tokenizers library panics (a Rust panic, not a Python error) on a merge whose parts or result
    # are not tokens, so check them here
    vocab = set(tokens)
    for merge in merges:
        left, space, right = merge.partition(" ")
        if not (space and left in vocab and right in vocab and left + right in vocab):
            raise ModelFileError(f"tokenizer.ggml.merges holds {_show(merge)}, which is not a merge of two tokens "
                                 f"into a third: corrupt file")
