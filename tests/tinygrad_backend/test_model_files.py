"""Model files: the architectures that must load, and the bad files that must fail fast and clearly."""

from __future__ import annotations

import contextlib
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.servers import ROOT, free_port
from tests.tinygrad_backend.tiny_gguf import (
    ARRAY,
    F32,
    GGML_Q4_0,
    I32,
    STRING,
    U8,
    U16,
    U32,
    U64,
    Arr,
    Raw,
    Tensor,
    replace_field,
    tiny_fields,
    tiny_tensors,
    write_raw,
    write_tiny,
)
from tinygrad_backend import gguf_file
from tinygrad_backend.chat_template import ChatTemplate, TemplateError
from tinygrad_backend.cli import resolve_model
from tinygrad_backend.gguf_file import ModelFileError, read_header
from tinygrad_backend.tokenizer import GGUFTokenizer


def _run_backend(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tinygrad_backend", "--port", str(free_port()), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_architectures_load_and_run(tmp_path: Path, arch: str) -> None:
    from tinygrad_backend.model import Model

    header = read_header(write_tiny(tmp_path / f"{arch}.gguf", arch))
    tokenizer = GGUFTokenizer(header.metadata)
    model = Model(header, 64, progress=lambda _: None)
    logits = model.next_logits(tokenizer.encode("hello hello"))
    assert logits.shape == (tokenizer.vocab_size,)
    assert np.isfinite(logits).all()
    again = model.next_logits(tokenizer.encode("hello hello"))  # the same prompt from the KV cache
    np.testing.assert_allclose(again, logits, rtol=1e-3, atol=1e-3)


def test_bundled_model_header() -> None:
    model_id, path = resolve_model("smollm2")
    header = read_header(path)
    assert (model_id, header.architecture, header.context_length) == ("smollm2", "llama", 8192)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        read_header(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("just some text, long enough to have a header's worth of bytes")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_header(path)


def test_truncated_file(tmp_path: Path) -> None:
    whole = write_tiny(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) - 5000])
    with pytest.raises(ModelFileError, match="truncated"):
        read_header(cut)


def test_header_cut_inside_metadata(tmp_path: Path) -> None:
    whole = write_tiny(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:300])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        read_header(cut)


def test_corrupt_lengths_do_not_allocate(tmp_path: Path) -> None:
    data = bytearray(write_tiny(tmp_path / "whole.gguf").read_bytes())
    data[24:32] = (2**62).to_bytes(8, "little")  # the first key's length: absurd
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError):
        read_header(bad)


def test_unsupported_architecture(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="architecture 'mamba' is not supported"):
        read_header(write_tiny(tmp_path / "m.gguf", "mamba"))


def test_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="tokenizer"):
        read_header(write_tiny(tmp_path / "t.gguf", with_tokenizer=False))


@pytest.mark.parametrize("make", ["missing", "truncated", "unsupported"])
def test_server_refuses_bad_files_with_status_2(tmp_path: Path, make: str) -> None:
    if make == "missing":
        path = tmp_path / "missing.gguf"
    elif make == "truncated":
        whole = write_tiny(tmp_path / "w.gguf").read_bytes()
        path = tmp_path / "cut.gguf"
        path.write_bytes(whole[:-4000])
    else:
        path = write_tiny(tmp_path / "m.gguf", "mamba")
    start = time.monotonic()
    result = _run_backend("--model", str(path))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 30  # fails at once, no hang


def test_weights_that_fail_to_load_stop_the_server_with_status_2(tmp_path: Path) -> None:
    """A header that passes the checks but weights tinygrad cannot load: the server has already started
    (and answered `loading`), then stops with one clear line and status 2."""
    path = write_tiny(tmp_path / "holes.gguf", drop=("blk.1.ffn_up.weight",))
    result = _run_backend("--model", str(path), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "error: the model failed to load" in result.stderr and "Traceback" not in result.stderr


def test_port_in_use_is_status_2(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "tinygrad_backend", "--model", str(write_tiny(tmp_path / "l.gguf")),
                                 "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot listen" in result.stderr


@pytest.mark.parametrize(("flag", "value", "message"), [("--parallel", "0", "--parallel must be between 1 and 64"),
                                                        ("--max-context", "8", "--max-context must be at least 16")])
def test_bad_settings_are_status_2(tmp_path: Path, flag: str, value: str, message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "tinygrad_backend", "--model", str(write_tiny(tmp_path / "l.gguf")),
                             flag, value], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


# --- hostile headers ------------------------------------------------------------------------------------
# Each builds a small file that is valid but for one thing, and names the sentence it must fail with.

Build = Callable[[Path], Path]


def _raw(fields: list[tuple[str, int, Any]] | None = None, tensors: list[Tensor] | None = None, **kw: Any) -> Build:
    return lambda tmp: write_raw(tmp / "hostile.gguf", tiny_fields() if fields is None else fields,
                                 tiny_tensors() if tensors is None else tensors, **kw)


def _field(key: str, vtype: int, value: Any) -> Build:
    return _raw(replace_field(tiny_fields(), key, vtype, value))


def _tensor(name: str, **change: Any) -> Build:
    tensors = [Tensor(**{**t.__dict__, **change}) if t.name == name else t for t in tiny_tensors()]
    return _raw(tensors=tensors)


def _bytes(data: bytes) -> Build:
    def build(tmp: Path) -> Path:
        (tmp / "hostile.gguf").write_bytes(data)
        return tmp / "hostile.gguf"
    return build


_NESTED = struct.pack("<IQ", ARRAY, 1) * 5000 + struct.pack("<IQ", U8, 0)  # 5000 arrays, each holding the next

HOSTILE: dict[str, tuple[Build, str]] = {
    "empty file": (_bytes(b""), r"too small to be a GGUF file \(0 bytes\)"),
    "bad magic": (_raw(magic=b"GGML"), "not a GGUF file"),
    "version 1": (_raw(version=1), "GGUF version 1 is not supported"),
    "big-endian": (_raw(version=3 << 24), "big-endian"),
    "alignment 0": (_field("general.alignment", U32, 0), "general.alignment is 0, not a power of two"),
    "alignment 24": (_field("general.alignment", U32, 24), "general.alignment is 24, not a power of two"),
    "alignment a string": (_field("general.alignment", STRING, "32"), "general.alignment is '32', not a power"),
    "alignment 2**31": (_field("general.alignment", U32, 2**31), "tensor data would start at byte 2,147,483,648"),
    "arrays nested 5000 deep": (_field("x.nested", ARRAY, Raw(_NESTED)), "nests arrays more than 3 deep"),
    "array of 2**62 items": (_field("x.big", ARRAY, Arr(U8, [], count=2**62)), "claims 4,611,686,018,427,387,904 items"),
    "array of strings the file cannot hold": (_field("x.big", ARRAY, Arr(STRING, [], count=10_000)), "claims 10,000 items"),
    "string of 2**62 bytes": (_field("general.name", STRING, Raw(struct.pack("<Q", 2**62))),
                              "ends inside metadata 'general.name'"),
    "2**60 tensors": (_raw(n_tensors=2**60), "claims 1,152,921,504,606,846,976 tensors"),
    "2**60 metadata entries": (_raw(n_kv=2**60), "claims 1,152,921,504,606,846,976 metadata entries"),
    "duplicate key": (_raw([*tiny_fields(), ("llama.context_length", U32, 2**30)]),
                      "metadata key 'llama.context_length' appears twice"),
    "duplicate tensor": (_raw(tensors=[*tiny_tensors(), Tensor("blk.0.attn_q.weight", (8, 8))]),
                         "tensor 'blk.0.attn_q.weight' appears twice"),
    "dimension of 0": (_tensor("output_norm.weight", shape=(0,)), r"impossible shape \[0\]"),
    "dimensions that overflow": (_tensor("output_norm.weight", shape=(2**63, 2**63)), "impossible shape"),
    "5 dimensions": (_tensor("output_norm.weight", shape=(8, 1, 1, 1, 1)), "claims 5 dimensions"),
    "offset not aligned": (_tensor("output_norm.weight", offset=4), "offset 4, which is not a multiple of the alignment"),
    "tensors that overlap": (_tensor("output_norm.weight", offset=0),
                             "tensors 'token_embd.weight' and 'output_norm.weight' overlap"),
    "offset past the end": (_tensor("output_norm.weight", offset=2**40), "truncated: tensor 'output_norm.weight' needs bytes"),
    "data cut short": (_raw(data_bytes=9000),
                       "truncated: tensor 'blk.0.attn_output.weight' needs bytes up to 14,368 but the file has 14,120"),
    "a tensor larger than the file": (_raw(data_bytes=100), "token_embd.weight' of shape \\[8, 263\\] needs 8,416 bytes"),
    "unknown ggml type": (_tensor("output_norm.weight", ggml_type=99), "ggml type 99, which tinygrad cannot unpack"),
    "rows not whole blocks": (_tensor("blk.0.attn_q.weight", ggml_type=GGML_Q4_0), "not a whole number of its type's blocks"),
    "context length a string": (_field("llama.context_length", STRING, "4096"),
                                "llama.context_length is '4096'; it must be an integer of at least 1"),
    "context length negative": (_field("llama.context_length", I32, -1), "llama.context_length is -1; it must be"),
    "context length missing": (_field("llama.context_length", U32, None), "lacks llama.context_length"),
    "a trillion blocks": (_field("llama.block_count", U64, 10**12), "block_count is 1,000,000,000,000, more blocks than"),
    "more blocks than weights": (_field("llama.block_count", U32, 2), "block 1 has no attention weights"),
    "no heads": (_field("llama.attention.head_count", U32, 0), "llama.attention.head_count is 0"),
    "heads not a multiple of kv heads": (_field("llama.attention.head_count_kv", U32, 3), "not a multiple of head_count_kv"),
    "width not the embedding's": (_field("llama.embedding_length", U32, 4096),
                                  r"token_embd.weight has shape \[8, 263\] where the metadata implies \[4096, 263\]"),
    "rope base NaN": (_field("llama.rope.freq_base", F32, float("nan")), "llama.rope.freq_base is nan"),
    "tokens not strings": (_field("tokenizer.ggml.tokens", ARRAY, Arr(U32, list(range(263)))),
                           "tokenizer.ggml.tokens is an array of 263 int items, not an array of strings"),
    "tokens a string": (_field("tokenizer.ggml.tokens", STRING, "abc"), "tokens is 'abc', not an array of strings"),
    "tokens an array of arrays": (_field("tokenizer.ggml.tokens", ARRAY, Arr(ARRAY, [Arr(STRING, ["a"])])),
                                  "not an array of strings"),
    "too few token types": (_field("tokenizer.ggml.token_type", ARRAY, Arr(I32, [1])), "has 1 entries for 263 tokens"),
    "merges not strings": (_field("tokenizer.ggml.merges", ARRAY, Arr(U8, [1, 2])), "merges is an array of 2 int items"),
    "merge into no token": (_field("tokenizer.ggml.merges", ARRAY, Arr(STRING, ["h e", "x y"])),
                            "merges holds 'x y', which is not a merge of two tokens"),
    "pre-tokenizer an array": (_field("tokenizer.ggml.pre", ARRAY, Arr(STRING, ["smollm"])), "pre is an array"),
    "bos past the vocabulary": (_field("tokenizer.ggml.bos_token_id", U32, 263), "bos_token_id is 263, past the 263 tokens"),
    "add_bos a string": (_field("tokenizer.ggml.add_bos_token", STRING, "yes"), "add_bos_token is 'yes', not a boolean"),
    "chat template not a string": (_field("tokenizer.chat_template", U32, 7), "tokenizer.chat_template is 7, not a string"),
    "split model": (_field("split.count", U16, 3), "split.count is 3: a model split over several files"),
}


def test_the_raw_writer_writes_a_valid_model(tmp_path: Path) -> None:
    """The control for HOSTILE: the file each case changes one thing of is itself fine."""
    header = read_header(_raw()(tmp_path))
    assert header.context_length == 64 and len(header.tensors) == 11
    assert GGUFTokenizer(header.metadata).encode("hello") == [262]
    aligned = _raw(replace_field(tiny_fields(), "general.alignment", U32, 64), alignment=64)(tmp_path)
    assert read_header(aligned).data_start % 64 == 0
    # arrays of arrays are legal, to a point
    assert read_header(_field("x.nested", ARRAY, Arr(ARRAY, [Arr(ARRAY, [Arr(U8, [1])])]))(tmp_path)).metadata[
        "x.nested"] == [[[1]]]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_header_fails_with_one_sentence(tmp_path: Path, case: str) -> None:
    build, message = HOSTILE[case]
    path = build(tmp_path)
    with pytest.raises(ModelFileError, match=message) as raised:
        read_header(path)
    text = str(raised.value)
    assert text.startswith(str(path)) and "\n" not in text and len(text) < 300, text


def test_array_items_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An array item takes one byte in the file and up to ~60 as a Python object: the metadata's items
    together are capped (at 16.7M; here, lowered, at 100)."""
    monkeypatch.setattr(gguf_file, "MAX_ARRAY_ITEMS", 100)
    with pytest.raises(ModelFileError, match="more than 100 array items"):
        read_header(_raw()(tmp_path))


_AT_START = ["empty file", "alignment 0", "arrays nested 5000 deep", "array of 2**62 items", "context length a string",
             "tokens not strings", "merge into no token", "bos past the vocabulary", "chat template not a string"]


def test_server_refuses_hostile_files_with_one_line_and_status_2(tmp_path: Path) -> None:
    """`python -m tinygrad_backend` on each: status 2, one `error:` line, no traceback, at once (the header,
    tokenizer and template are checked before tinygrad loads anything). The servers run side by side."""
    procs = {}
    for i, case in enumerate(_AT_START):
        (tmp_path / str(i)).mkdir()
        path = HOSTILE[case][0](tmp_path / str(i))
        procs[case] = subprocess.Popen([sys.executable, "-m", "tinygrad_backend", "--model", str(path),
                                        "--port", str(free_port())], cwd=ROOT, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    for case, proc in procs.items():
        try:
            _, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (case, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, stderr)
        assert "Traceback" not in stderr and "panicked" not in stderr, (case, stderr)


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    """A small valid model file, with a chat template, and where its tensor data starts."""
    path = write_raw(tmp_path_factory.mktemp("valid") / "valid.gguf",
                     tiny_fields("llama", "{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}"),
                     tiny_tensors())
    return path.read_bytes(), read_header(path).data_start


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 2**20)))
def test_corrupted_files_fail_only_with_model_file_error(tmp_path: Path, valid_gguf: tuple[bytes, int],
                                                         flips: list[tuple[int, int]], cut: int | None) -> None:
    """Bytes of a small valid file changed at random (in its header: the data is only zeros), and the file
    cut anywhere: the header reads, or fails with ModelFileError, never anything else; and from a header
    that reads, the tokenizer and the chat template build or fail with their own errors."""
    valid, header_bytes = valid_gguf
    data = bytearray(valid)
    for pos, byte in flips:
        data[pos % header_bytes] = byte
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(bytes(data[: None if cut is None else cut % (len(data) + 1)]))
    try:
        header = read_header(path)
    except ModelFileError as e:
        assert "\n" not in str(e)
        return
    with contextlib.suppress(ModelFileError):
        GGUFTokenizer(header.metadata)
    with contextlib.suppress(TemplateError):
        ChatTemplate(header.metadata.get("tokenizer.chat_template"))
