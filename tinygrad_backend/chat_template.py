"""Turn a list of chat messages into the prompt text the model was trained on.

The template comes from the GGUF (`tokenizer.chat_template`), which makes it untrusted input: it is
rendered in jinja2's immutable sandbox, as Hugging Face's `apply_chat_template` does, so a template can
neither reach Python internals nor mutate what it is given, and under render limits (render_limits.py), so
it can neither run without end nor fill memory. A file without a template gets ChatML, the format SmolLM2
and Qwen use. A template past a limit fails with TemplateLimitError; the server answers that request 400.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2

from tinygrad_backend.render_limits import (
    RenderLimits,
    TemplateError,
    TemplateLimitError,
    compile_limited,
    limited_environment,
    render_limited,
)

__all__ = ["CHATML", "ChatTemplate", "RenderLimits", "TemplateError", "TemplateLimitError"]

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_exception(message: str) -> None:
    text = str(message)
    raise TemplateError(text if len(text) <= 1000 else text[:997] + "...")


def _tojson(value: Any, indent: int | str | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "",
                 limits: RenderLimits | None = None) -> None:
        self.source = source or CHATML
        self.is_fallback = source is None
        self.limits = limits or RenderLimits()
        # the same environment settings as transformers' _compile_jinja_template
        env = limited_environment({"tojson": _tojson}, {
            "raise_exception": _raise_exception, "strftime_now": lambda fmt: datetime.now().strftime(fmt)},
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        try:
            self._template = compile_limited(env, self.source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the model's chat template does not compile: {_short(e)}") from e
        except (RecursionError, MemoryError) as e:
            raise TemplateError("the model's chat template does not compile: it nests too deeply") from e
        except Exception as e:  # jinja's compiler on a source it was not written for
            raise TemplateError(f"the model's chat template does not compile: {type(e).__name__}: {_short(e)}") from e
        self._bos, self._eos = bos_token, eos_token

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        try:
            return render_limited(self._template, self.limits, (messages, tools, self._bos, self._eos),
                                  messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                  bos_token=self._bos, eos_token=self._eos)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:  # includes SecurityError from the sandbox
            raise TemplateError(f"the model's chat template failed: {_short(e)}") from e
        except RecursionError as e:
            raise TemplateError("the model's chat template failed: it recursed too deeply") from e
        except MemoryError as e:
            raise TemplateError("the model's chat template failed: it ran out of memory") from e
        except Exception as e:  # anything else the template's own code raised: TypeError, OverflowError, ...
            raise TemplateError(f"the model's chat template failed on these messages: {type(e).__name__}: "
                                f"{_short(e)}") from e
