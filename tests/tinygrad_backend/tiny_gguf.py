"""Write tiny GGUF models with random weights, for tests of loading and of bad files.

Real Llama, Qwen2 and Qwen3 files are gigabytes and cannot be downloaded here; a two-block model of
each architecture, written with llama.cpp's own `gguf` writer, has the same tensors and metadata.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokens() -> list[str]:
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in bs]
    table = {b: chr(b) for b in bs} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)]


def write_tiny(path: Path, arch: str = "llama", context: int = 64, template: str | None = None,
               with_tokenizer: bool = True, drop: tuple[str, ...] = ()) -> Path:
    dim, hidden, heads, kv_heads, blocks = 64, 128, 4, 2, 2
    head_dim = dim // heads
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(blocks)
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    tokens = SPECIALS + byte_tokens() + ["he", "ll", "hell", "hello"]
    if with_tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "smollm")
        w.add_token_list(tokens)
        w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
        w.add_token_merges(["h e", "l l", "he ll", "hell o"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
        if template is not None:
            w.add_chat_template(template)

    def t(name: str, *shape: int) -> None:
        if name not in drop:
            w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    vocab = len(tokens)
    t("token_embd.weight", vocab, dim)
    w.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    for i in range(blocks):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(dim, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(dim, dtype=np.float32))
        t(f"blk.{i}.attn_q.weight", dim, dim)
        t(f"blk.{i}.attn_k.weight", kv_heads * head_dim, dim)
        t(f"blk.{i}.attn_v.weight", kv_heads * head_dim, dim)
        t(f"blk.{i}.attn_output.weight", dim, dim)
        t(f"blk.{i}.ffn_gate.weight", hidden, dim)
        t(f"blk.{i}.ffn_up.weight", hidden, dim)
        t(f"blk.{i}.ffn_down.weight", dim, hidden)
        if arch == "qwen2":
            t(f"blk.{i}.attn_q.bias", dim)
            t(f"blk.{i}.attn_k.bias", kv_heads * head_dim)
            t(f"blk.{i}.attn_v.bias", kv_heads * head_dim)
        if arch == "qwen3":
            w.add_tensor(f"blk.{i}.attn_q_norm.weight", np.ones(head_dim, dtype=np.float32))
            w.add_tensor(f"blk.{i}.attn_k_norm.weight", np.ones(head_dim, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- a raw GGUF writer, for hostile files --------------------------------------------------------------
# llama.cpp's writer refuses to write a bad file; this one writes whatever it is told: any type for any
# key, duplicate keys, wrong counts, raw bytes for a value, tensors at any offset.

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FORMATS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
            U64: "<Q", I64: "<q", F64: "<d"}
GGML_F32, GGML_Q4_0 = 0, 2


@dataclass
class Arr:
    """An array value: its items' type, the items (an Arr for an array of arrays), and the count written
    when it is not len(items)."""

    item_type: int
    items: list[Any]
    count: int | None = None


@dataclass
class Raw:
    """A value written as these bytes, whatever its type says."""

    data: bytes


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost dimension first
    ggml_type: int = GGML_F32
    offset: int | None = None  # None: the next aligned place after the previous tensor
    n_dims: int | None = None  # the count written, when it is not len(shape)


def pack_value(vtype: int, value: Any) -> bytes:
    if isinstance(value, Raw):
        return value.data
    if vtype == STRING:
        raw = value.encode() if isinstance(value, str) else value
        return struct.pack("<Q", len(raw)) + raw
    if vtype == ARRAY:
        count = len(value.items) if value.count is None else value.count
        return struct.pack("<IQ", value.item_type, count) + b"".join(pack_value(value.item_type, v) for v in value.items)
    return struct.pack(_FORMATS[vtype], value)


def tensor_nbytes(t: Tensor) -> int:
    per_block, block_bytes = {GGML_Q4_0: (32, 18)}.get(t.ggml_type, (1, 4))
    return math.prod(t.shape) // per_block * block_bytes


def write_raw(path: Path, fields: list[tuple[str, int, Any]], tensors: list[Tensor], *, magic: bytes = b"GGUF",
              version: int = 3, n_kv: int | None = None, n_tensors: int | None = None, alignment: int = 32,
              data_bytes: int | None = None) -> Path:
    """A GGUF file of `fields` (key, type, value) and `tensors`, their data all zeros; `alignment` lays the
    data out (whatever general.alignment says), `data_bytes` sets the data section's size. The data ends
    after the last tensor placed here; a tensor given an offset, or of an absurd size, takes no room."""
    out = bytearray(magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                        len(fields) if n_kv is None else n_kv))
    for key, vtype, value in fields:
        out += pack_value(STRING, key) + struct.pack("<I", vtype) + pack_value(vtype, value)
    end = 0
    for t in tensors:
        offset = -(-end // alignment) * alignment if t.offset is None else t.offset
        if t.offset is None and tensor_nbytes(t) < 1 << 24:
            end = offset + tensor_nbytes(t)
        out += pack_value(STRING, t.name) + struct.pack("<I", len(t.shape) if t.n_dims is None else t.n_dims)
        out += b"".join(struct.pack("<Q", d) for d in t.shape) + struct.pack("<IQ", t.ggml_type, offset)
    out += bytes(-len(out) % alignment)
    out += bytes(end if data_bytes is None else data_bytes)
    path.write_bytes(bytes(out))
    return path


def tiny_fields(arch: str = "llama", template: str | None = None) -> list[tuple[str, int, Any]]:
    """The metadata of a one-block model of width 8 (2 heads of 4, 1 KV head) with write_tiny's tokenizer."""
    tokens = SPECIALS + byte_tokens() + ["he", "ll", "hell", "hello"]
    fields: list[tuple[str, int, Any]] = [
        ("general.architecture", STRING, arch), ("general.name", STRING, f"raw-{arch}"),
        (f"{arch}.block_count", U32, 1), (f"{arch}.context_length", U32, 64), (f"{arch}.embedding_length", U32, 8),
        (f"{arch}.feed_forward_length", U32, 16), (f"{arch}.attention.head_count", U32, 2),
        (f"{arch}.attention.head_count_kv", U32, 1), (f"{arch}.rope.freq_base", F32, 10000.0),
        (f"{arch}.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("tokenizer.ggml.model", STRING, "gpt2"), ("tokenizer.ggml.pre", STRING, "smollm"),
        ("tokenizer.ggml.tokens", ARRAY, Arr(STRING, tokens)),
        ("tokenizer.ggml.token_type", ARRAY, Arr(I32, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))),
        ("tokenizer.ggml.merges", ARRAY, Arr(STRING, ["h e", "l l", "he ll", "hell o"])),
        ("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.add_bos_token", BOOL, False),
    ]
    if template is not None:
        fields.append(("tokenizer.chat_template", STRING, template))
    return fields


def tiny_tensors() -> list[Tensor]:
    vocab = len(SPECIALS) + 256 + 4
    return [Tensor("token_embd.weight", (8, vocab)), Tensor("output_norm.weight", (8,)),
            Tensor("blk.0.attn_norm.weight", (8,)), Tensor("blk.0.attn_q.weight", (8, 8)),
            Tensor("blk.0.attn_k.weight", (8, 4)), Tensor("blk.0.attn_v.weight", (8, 4)),
            Tensor("blk.0.attn_output.weight", (8, 8)), Tensor("blk.0.ffn_norm.weight", (8,)),
            Tensor("blk.0.ffn_gate.weight", (8, 16)), Tensor("blk.0.ffn_up.weight", (8, 16)),
            Tensor("blk.0.ffn_down.weight", (16, 8))]


def replace_field(fields: list[tuple[str, int, Any]], key: str, vtype: int, value: Any) -> list[tuple[str, int, Any]]:
    """`fields` with `key` set to (vtype, value), or appended; value None removes it."""
    out = [f for f in fields if f[0] != key]
    return out if value is None else [*out, (key, vtype, value)]
