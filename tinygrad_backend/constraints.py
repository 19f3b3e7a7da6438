"""Grammar-constrained decoding: JSON schemas (`response_format`, Ollama's `format`) and tool calls.

llguidance does the work (README.md says why it, not xgrammar or outlines-core): a grammar is compiled per
request in the HTTP handler, before anything is submitted, so a schema it cannot take is a 400 naming the
problem; the compiled matcher then travels with its generation into the engine, where each slot keeps its own.

The mask for a slot's next token depends only on the tokens it has accepted, so it is computed as soon as a
token is accepted, on a worker thread (llguidance releases the GIL), while the engine runs the next forward
pass; the sampler waits for it only if it is not done yet. Whatever goes wrong in a matcher (a token it refuses,
a grammar that runs out of its limits) raises ConstraintError, which fails that generation alone.

A `Constraint` may wait for a trigger: in tool_choice `auto` the model writes freely until it opens a tool call
(`<tool_call>`), and only from there is it held to the tools' schemas, as llama.cpp's lazy grammars do.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from tinygrad_backend.tokenizer import GGUFTokenizer

# JSON as the grammar writes it: no whitespace between tokens (llguidance's `whitespace_flexible: false`), so a
# small model cannot wander into endless spaces or newlines, and the separators are the compact ones.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
MAX_SCHEMA_CHARS = 64 * 1024
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_MASK_WORKERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-mask")


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile; the message names the problem."""


class ConstraintError(RuntimeError):
    """A matcher refused a token or stopped working: the generation it constrains fails."""


class Grammars:
    """Compiles grammars against one model's tokenizer. The llguidance tokenizer it needs is built once, on
    first use (it walks the whole vocabulary), under a lock: requests compile on worker threads."""

    def __init__(self, tokenizer: GGUFTokenizer) -> None:
        self.tokenizer = tokenizer
        self._lltok: Any = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._lltok is None:
                import llguidance

                tok = self.tokenizer
                self._lltok = llguidance.LLTokenizer(tok.backend_json(), n_vocab=tok.vocab_size,
                                                     eos_token=sorted(tok.end_ids))
            return self._lltok

    def token_ref(self, text: str) -> str:
        """`text` as a Lark terminal: a special token of the vocabulary by id (llguidance matches special tokens
        only so), else the string."""
        token = self.tokenizer.special_token(text)
        return f"<[{token}]>" if token is not None else json.dumps(text)

    def json_schema(self, schema: dict[str, Any] | None) -> Constraint:
        """A constraint to JSON that validates against `schema` (None: any JSON object)."""
        return self.lark(f"start: {json_rule(schema)}\n")

    def lark(self, grammar: str, trigger: str | None = None) -> Constraint:
        """A constraint from a Lark grammar (llguidance's dialect, `%json {...}` included); with `trigger`, it
        applies only from where the generated text first contains the trigger."""
        import llguidance

        lltok = self._llg_tokenizer()
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(_first_line(matcher.get_error()))
        return Constraint(matcher, lltok, self.tokenizer, trigger)


def json_rule(schema: dict[str, Any] | None) -> str:
    """A Lark rule body for JSON valid against `schema`, written the compact way (JSON_OPTIONS)."""
    body = dict(schema if schema is not None else ANY_OBJECT)
    body["x-guidance"] = {**JSON_OPTIONS, **(body.get("x-guidance") or {})}
    text = json.dumps(body, ensure_ascii=False)
    if len(text) > MAX_SCHEMA_CHARS:
        raise GrammarError(f"the schema is longer than {MAX_SCHEMA_CHARS} characters")
    return f"%json {text}"


def _first_line(message: str) -> str:
    """llguidance's message without its position prefix, its echo of the grammar and its parser state."""
    text = re.sub(r"^at \d+\(\d+\): ", "", message.strip().split("\n<state>", 1)[0])
    echo = re.search(r"\n\s*\d+ \|", text)
    return (text[: echo.start()] if echo else text).strip()[:500]


class Constraint:
    """One generation's grammar state: the mask of tokens it allows next, and the tokens it has taken.

    Used by one thread at a time: the engine's, except while a mask is being computed on a worker, which the
    engine waits for (`allowed`) before touching the matcher again."""

    def __init__(self, matcher: Any, lltok: Any, tokenizer: GGUFTokenizer, trigger: str | None = None) -> None:
        self._matcher, self._lltok, self._tokenizer = matcher, lltok, tokenizer
        self._bitmask = np.full((tokenizer.vocab_size + 31) // 32, -1, dtype=np.int32)
        self._future: Future[None] | None = None
        self._trigger = trigger.encode() if trigger else None
        self._seen = b""  # before the trigger: the text so far, to find it in
        self.active = trigger is None
        self.tokens = 0  # tokens the matcher has taken
        self.mask_seconds = 0.0  # time spent computing masks (on the worker), for the benchmark

    def prepare(self) -> None:
        """Start computing the next mask on a worker, if there is one to compute."""
        if self.active and self._future is None and not self._matcher.is_stopped():
            self._future = _MASK_WORKERS.submit(self._compute)

    def _compute(self) -> None:
        start = time.perf_counter()
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        self.mask_seconds += time.perf_counter() - start

    def allowed(self) -> np.ndarray | None:
        """The tokens the grammar allows next, one bool each; None while it waits for its trigger."""
        if not self.active:
            return None
        self.prepare()
        assert self._future is not None
        self._future.result()
        self._future = None
        if self._matcher.is_error():
            raise ConstraintError(f"the grammar failed: {_first_line(self._matcher.get_error())}")
        return np.unpackbits(self._bitmask.view(np.uint8), bitorder="little", count=self._tokenizer.vocab_size).view(bool)

    def accept(self, token: int) -> None:
        """Take the token the sampler chose, and start on the next mask."""
        if self._future is not None:
            self._future.result()
            self._future = None
        if not self.active:
            self._watch(token)
        elif not self._matcher.consume_token(token):
            raise ConstraintError(f"the grammar refused token {token}: {_first_line(self._matcher.get_error())}")
        else:
            self.tokens += 1
        self.prepare()

    def _watch(self, token: int) -> None:
        assert self._trigger is not None
        self._seen += self._tokenizer.token_bytes(token)
        at = self._seen.find(self._trigger)
        if at < 0:
            self._seen = self._seen[-len(self._trigger):]
            return
        self.active = True
        rest = self._seen[at + len(self._trigger):]  # the trigger ended inside this token: feed what followed it
        if rest and not self._matcher.consume_tokens(self._lltok.tokenize_bytes(rest)):
            raise ConstraintError(f"the grammar refused the text after {self._trigger.decode()!r}")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (an end token aside)."""
        return self.active and self._matcher.is_stopped()

    def close(self) -> None:
        """Wait for a mask still being computed: the matcher must not be freed under a worker."""
        if self._future is not None:
            self._future.result()
            self._future = None
