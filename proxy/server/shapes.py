"""OpenAI's response shapes, built from LiteLLM's objects: only the fields OpenAI defines, the served model
named, nothing of LiteLLM's own (provider_specific_fields, hidden params) passed on to clients."""

from __future__ import annotations

from typing import Any


def has_text(choice: dict[str, Any]) -> bool:
    return bool((choice.get("delta") or {}).get("content") or choice.get("text"))


def _message(m: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role or "assistant", "content": m.content}
    if getattr(m, "tool_calls", None):
        out["tool_calls"] = [tc.model_dump(exclude_none=True) if hasattr(tc, "model_dump") else tc for tc in m.tool_calls]
    return out


def _usage(u: Any) -> dict[str, int] | None:
    if u is None:
        return None
    return {"prompt_tokens": int(u.prompt_tokens or 0), "completion_tokens": int(u.completion_tokens or 0),
            "total_tokens": int(u.total_tokens or 0)}


def chat_dict(r: Any, model: str) -> dict[str, Any]:
    return {"id": r.id, "object": "chat.completion", "created": r.created, "model": model,
            "system_fingerprint": getattr(r, "system_fingerprint", None),
            "choices": [{"index": c.index, "message": _message(c.message), "logprobs": None,
                         "finish_reason": c.finish_reason} for c in r.choices],
            "usage": _usage(getattr(r, "usage", None))}


def text_dict(r: Any, model: str) -> dict[str, Any]:
    return {"id": r.id, "object": "text_completion", "created": r.created, "model": model,
            "choices": [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                        for c in r.choices],
            "usage": _usage(getattr(r, "usage", None))}


def chat_chunk(c: Any, model: str) -> dict[str, Any] | None:
    choices = []
    for ch in c.choices:
        d = ch.delta
        delta: dict[str, Any] = {}
        if d is not None:
            if d.role:
                delta["role"] = d.role
            if d.content is not None:
                delta["content"] = d.content
            if d.tool_calls:
                delta["tool_calls"] = [tc.model_dump(exclude_none=True) for tc in d.tool_calls]
        choices.append({"index": ch.index, "delta": delta, "logprobs": None, "finish_reason": ch.finish_reason})
    out = {"id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": model, "choices": choices}
    usage = _usage(getattr(c, "usage", None))
    if usage is not None:
        out["usage"] = usage
    return out


def text_chunk(c: Any, model: str) -> dict[str, Any] | None:
    choices = [{"index": ch.get("index", 0) if isinstance(ch, dict) else ch.index,
                "text": (ch.get("text") if isinstance(ch, dict) else ch.text) or "",
                "logprobs": None,
                "finish_reason": ch.get("finish_reason") if isinstance(ch, dict) else ch.finish_reason}
               for ch in c.choices]
    out = {"id": c.id, "object": "text_completion", "created": c.created, "model": model, "choices": choices}
    usage = _usage(getattr(c, "usage", None))
    if usage is not None:
        out["usage"] = usage
    return out


def as_chunks(whole: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A whole answer (chat_dict or text_dict) as the stream a client asked for: the content in one chunk, then
    the finish, then the usage when asked. For a stream held back until its answer was checked."""
    chat = whole["object"] == "chat.completion"
    head = {"id": whole["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": whole["created"], "model": whole["model"]}
    content, finish = [], []
    for c in whole["choices"]:
        if chat:
            delta = dict(c["message"])
            if "tool_calls" in delta:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(delta["tool_calls"])]
            content.append({"index": c["index"], "delta": delta, "logprobs": None, "finish_reason": None})
            finish.append({"index": c["index"], "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"]})
        else:
            content.append({"index": c["index"], "text": c["text"], "logprobs": None, "finish_reason": None})
            finish.append({"index": c["index"], "text": "", "logprobs": None, "finish_reason": c["finish_reason"]})
    chunks = [{**head, "choices": content}, {**head, "choices": finish}]
    if include_usage and whole.get("usage") is not None:
        chunks.append({**head, "choices": [], "usage": whole["usage"]})
    return chunks
