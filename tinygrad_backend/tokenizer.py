"""The model's tokenizer, built exactly from the GGUF with the `tokenizers` library.

llama.cpp is the reference: for the same file our ids must equal its ids (tests/tinygrad_backend/data
holds its ids for a few hundred strings). tinygrad's own tokenizer rejects some pre-tokenizer names
(SmolLM2's `smollm`), so we build a byte-level BPE from `tokenizer.ggml.tokens` and `.merges` and
reproduce llama.cpp's pre-tokenizer split for the file's `tokenizer.ggml.pre`.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from tinygrad_backend.gguf_file import ModelFileError

# llama.cpp's split regexes per pre-tokenizer name, applied in order
# (https://github.com/ggml-org/llama.cpp/blob/b6000/src/llama-vocab.cpp, llm_tokenizer_bpe).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# name -> (regexes, ignore_merges): llama.cpp takes a word that is itself a token whole for llama3.
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "olmo", "mpt"), ((_GPT2,), False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), ((r"\p{N}", _GPT2), False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), ((_LLAMA3,), True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), ((_QWEN2,), False)),
}

_CONTROL, _USER_DEFINED = 3, 4


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _byte_decoder() -> dict[str, int]:
    # GPT-2's reversible byte<->unicode map
    # (https://github.com/openai/gpt-2/blob/9b63575ef42771a015060c964af2c3da4cf7c8ab/src/encoder.py#L9)
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in bs]
    return {chr(b): b for b in bs} | {chr(256 + i): b for i, b in enumerate(extra)}


class GGUFTokenizer:
    """Encode text to the model's token ids and decode ids back, as llama.cpp does for the same file."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges: list[str] = metadata.get("tokenizer.ggml.merges") or []
        pre = metadata.get("tokenizer.ggml.pre") or "default"
        if pre not in _PRE_TOKENIZERS:
            raise ModelFileError(
                f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(_PRE_TOKENIZERS))})"
            )
        regexes, ignore_merges = _PRE_TOKENIZERS[pre]

        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        try:
            bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges)  # type: ignore[arg-type]
        except Exception as e:  # the tokenizers library's own error for a vocabulary it cannot use
            raise ModelFileError(f"the tokenizer cannot be built from this file: {e}") from e
        self._tok = Tokenizer(bpe)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        self._tok.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        self._tok.decoder = decoders.ByteLevel()
        self.special_ids = {i for i, t in enumerate(types) if t == _CONTROL}
        specials = [i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
        self._tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in specials])
        self._specials = {tokens[i]: i for i in specials}

        byte_of = _byte_decoder()
        self._bytes: list[bytes] = [
            tok.encode() if types[i] in (_CONTROL, _USER_DEFINED) else bytes(byte_of.get(c, 0x3F) for c in tok)
            for i, tok in enumerate(tokens)
        ]
        self.vocab_size = len(tokens)
        self.bos_id: int | None = metadata.get("tokenizer.ggml.bos_token_id")
        self.eos_id: int | None = metadata.get("tokenizer.ggml.eos_token_id")
        self.add_bos: bool = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
        eot = metadata.get("tokenizer.ggml.eot_token_id")
        eom = metadata.get("tokenizer.ggml.eom_token_id")
        # generation ends at any end-of-turn token the file names, and at the ChatML/Llama-3 ones it holds
        ends = {i for i in (self.eos_id, eot, eom) if i is not None}
        for name in ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>"):
            if name in vocab and vocab[name] in self.special_ids:
                ends.add(vocab[name])
        self.end_ids = frozenset(ends)

    def token_text(self, token_id: int) -> str:
        return self._bytes[token_id].decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def special_token(self, text: str) -> int | None:
        """The id of the control or user-defined token spelled `text` (`<|im_end|>`, Qwen's `<tool_call>`)."""
        return self._specials.get(text)

    def backend_json(self) -> str:
        """The `tokenizers` tokenizer as JSON, which llguidance builds its own from (constraints.py)."""
        return self._tok.to_str()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids for `text`, matching special tokens inside it (llama.cpp's parse_special=true)."""
        # a lone UTF-16 surrogate (JSON can escape one) is not text; llama.cpp sees U+FFFD there too
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if _has_surrogate(text) else text
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        skip = self.special_ids if skip_special else frozenset()
        return b"".join(self._bytes[i] for i in ids if i not in skip).decode("utf-8", errors="replace")

    def stream_decoder(self) -> Callable[[int | None], str]:
        """A function fed one id at a time that returns the text completed so far; call with None to flush.

        A multi-byte character split over two tokens comes out whole with the second one.
        """
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def feed(token_id: int | None) -> str:
            if token_id is None:
                return dec.decode(b"", final=True)
            if token_id in self.special_ids:
                return ""
            return dec.decode(self._bytes[token_id])

        return feed
