"""Our token ids equal llama.cpp's for the bundled model (golden file from make_token_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinygrad_backend.cli import resolve_model
from tinygrad_backend.gguf_file import read_header
from tinygrad_backend.tokenizer import GGUFTokenizer

GOLDEN = json.loads((Path(__file__).parent / "data" / "smollm2_tokens.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer() -> GGUFTokenizer:
    return GGUFTokenizer(read_header(resolve_model("smollm2")[1]).metadata)


def test_golden_file_is_large_and_varied() -> None:
    texts = [c["text"] for c in GOLDEN["cases"]]
    assert len(texts) >= 200
    assert any("<|im_start|>" in t for t in texts)  # special tokens
    assert any(ord(ch) > 0xFFFF for t in texts for ch in t)  # emoji
    assert any("    " in t for t in texts)  # runs of whitespace


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: repr(c["text"])[:40])
def test_ids_equal_llama_cpp(tokenizer: GGUFTokenizer, case: dict) -> None:
    assert tokenizer.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: repr(c["text"])[:40])
def test_decode_round_trips(tokenizer: GGUFTokenizer, case: dict) -> None:
    assert tokenizer.decode(case["ids"], skip_special=False) == case["text"]


def test_stream_decoder_joins_split_characters(tokenizer: GGUFTokenizer) -> None:
    ids = tokenizer.encode("emoji 👨‍👩‍👧 end")
    feed = tokenizer.stream_decoder()
    pieces = [feed(i) for i in ids] + [feed(None)]
    assert "".join(pieces) == "emoji 👨‍👩‍👧 end"
    assert all("\ufffd" not in p for p in pieces)  # no half characters shown on the way


def test_end_tokens_include_chatml_end(tokenizer: GGUFTokenizer) -> None:
    assert tokenizer.encode("<|im_end|>")[0] in tokenizer.end_ids
