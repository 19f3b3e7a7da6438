"""Write tiny GGUF models with random weights, for tests of loading and of bad files.

Real Llama, Qwen2 and Qwen3 files are gigabytes and cannot be downloaded here; a two-block model of
each architecture, written with llama.cpp's own `gguf` writer, has the same tensors and metadata.
"""

from __future__ import annotations

from pathlib import Path

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
