"""The GGUF file's tensors for tinygrad, each read from the file only when it is first realized.

tinygrad 0.13.0's `gguf_load` copies the whole file into one tensor in memory, and every weight is a view
of it, so all of it (98 MB for SmolLM2-135M) stays alive until the last weight is realized: through the
whole of packing. Here each tensor is a tinygrad tensor over a numpy memory map of its own bytes (tinygrad
takes a numpy array as a buffer as it is, without a copy): realizing a weight reads just its pages, and
once the weight is packed or realized and the lazy tensor dropped, its map goes with it. The values are
tinygrad's own: its `ggml_data_to_tensor` unpacks each tensor's bytes, as gguf_load does from its copy.
The header is ours (gguf_file.py), already checked against the file's size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tinygrad import Tensor
from tinygrad.llm.gguf import ggml_data_to_tensor

from tinygrad_backend.gguf_file import GGUFHeader


def state_dict(header: GGUFHeader) -> dict[str, Tensor]:
    """{name: lazy tensor} for every tensor in the file, in tinygrad's shape order (outermost first)."""
    out = {}
    for info in header.tensors:
        # copy-on-write, as tinygrad wants a writable buffer (nothing writes it: pages stay the file's); a plain
        # ndarray view, as tinygrad takes no np.memmap (the view keeps the map alive)
        raw = np.memmap(header.path, dtype=np.uint8, mode="c", offset=header.data_start + info.offset, shape=(info.nbytes,))
        values = ggml_data_to_tensor(Tensor(raw.view(np.ndarray)), math.prod(info.shape), info.ggml_type)
        out[info.name] = values.reshape(*reversed(info.shape))
    return out


def gguf_load(header: GGUFHeader) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """What tinygrad.llm.gguf.gguf_load returns (the metadata, the tensors), without its copy of the file."""
    return dict(header.metadata), state_dict(header)
