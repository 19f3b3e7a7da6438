"""Model files: the architectures that must load, and the bad files that must fail fast and clearly."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.servers import ROOT, free_port
from tests.tinygrad_backend.tiny_gguf import write_tiny
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
