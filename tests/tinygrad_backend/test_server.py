"""The backend's HTTP contract, driven with the real `openai` and `ollama` clients.

All tests here share one backend process with the bundled model (conftest.bundled_backend) and ask for
a handful of tokens: the CPU is slow.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import ollama
import openai
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def client(bundled_backend: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=bundled_backend + "/v1", api_key="unused", max_retries=0)


def test_health_reports_ready_with_model_device_and_context(bundled_backend: str) -> None:
    body = httpx.get(bundled_backend + "/health").json()
    assert body["status"] == "ready"
    assert body["model"] == "smollm2"
    assert body["device"] == "CPU"
    assert body["context_length"] == 512
    assert body["slots"] == 4 and body["running"] == 0


def test_chat_answers_paris(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=8)
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.usage is not None and r.usage.prompt_tokens == 42  # llama.cpp counts 42 for this prompt too
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.model == "smollm2"


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=3,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("The")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stop_and_seed(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=8, stop=[" of"])
    assert r.choices[0].message.content == "The capital"
    assert r.choices[0].finish_reason == "stop"
    kwargs = {"model": "smollm2", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 4,
              "temperature": 1.5, "top_p": 0.95, "seed": 1234}
    first = client.chat.completions.create(**kwargs).choices[0].message.content  # type: ignore[call-overload]
    second = client.chat.completions.create(**kwargs).choices[0].message.content  # type: ignore[call-overload]
    assert first == second


def test_legacy_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=3, temperature=0)
    assert r.object == "text_completion"
    assert r.usage is not None and r.usage.completion_tokens == 3
    assert r.choices[0].text


def test_models_lists_the_loaded_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2"]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=QUESTION, max_tokens=1)
    assert e.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_prompt_longer_than_context_is_400_before_generation(client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "word " * 600}]
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=long, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    assert "maximum context length is 512" in e.value.body["message"]  # type: ignore[index]
    assert time.monotonic() - start < 5  # refused, not generated


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": QUESTION, "max_tokens": -1}, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": 2.5}, "max_tokens"),
    ({"messages": QUESTION, "temperature": 9}, "temperature"),
    ({"messages": QUESTION, "n": 2}, "n"),
    ({"messages": QUESTION, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/chat/tokenize"])  # the count reads a body alike
def test_bad_requests_are_400_in_openai_shape(bundled_backend: str, body: dict, param: str, path: str) -> None:
    r = httpx.post(bundled_backend + path, json={"model": "smollm2", **body})
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"].startswith(param)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/chat/tokenize"])
def test_malformed_json_is_400(bundled_backend: str, path: str) -> None:
    r = httpx.post(bundled_backend + path, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_concurrent_requests_decode_together_and_answer_as_alone(bundled_backend: str) -> None:
    """Four requests share decode steps (one slot each) and, greedy, get exactly the answers they get alone."""
    import asyncio
    import threading

    async def one(i: int) -> str:
        aclient = openai.AsyncOpenAI(base_url=bundled_backend + "/v1", api_key="unused", max_retries=0)
        r = await aclient.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": f"Count to {i}."}],
                                                  temperature=0, max_tokens=6)
        return r.choices[0].message.content or ""

    async def all_of_them() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(4)))

    async def one_by_one() -> list[str]:
        return [await one(i) for i in range(4)]

    alone = asyncio.run(one_by_one())
    most_running, done = 0, threading.Event()

    def watch() -> None:
        nonlocal most_running
        while not done.is_set():
            most_running = max(most_running, httpx.get(bundled_backend + "/health").json()["running"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        together = asyncio.run(all_of_them())
    finally:
        done.set()
        watcher.join()
    assert all(alone) and together == alone
    assert most_running >= 2, "the requests ran one after another"


def test_client_disconnect_stops_generation(bundled_backend: str) -> None:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.stream("POST", bundled_backend + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break  # one token seen: hang up
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = httpx.get(bundled_backend + "/health").json()
        if not health["busy"]:
            break
        time.sleep(0.2)
    assert not health["busy"], "generation went on after the client left"
    # and the backend still answers the next client
    r2 = httpx.post(bundled_backend + "/v1/chat/completions", json={"model": "smollm2", "messages": QUESTION, "max_tokens": 1})
    assert r2.status_code == 200


# --- Ollama's native API ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ollama_client(bundled_backend: str) -> ollama.Client:
    return ollama.Client(host=bundled_backend)


def test_ollama_chat(ollama_client: ollama.Client) -> None:
    # Ollama's default repeat_penalty (1.1, over the prompt too) turns this small model's greedy answer aside
    r = ollama_client.chat(model="smollm2", messages=QUESTION, options={"temperature": 0, "num_predict": 8,
                                                                        "repeat_penalty": 1.0})
    assert "Paris" in r.message.content
    assert r.done and r.prompt_eval_count == 42 and r.eval_count and r.eval_count <= 8


def test_ollama_chat_stream(ollama_client: ollama.Client) -> None:
    parts = list(ollama_client.chat(model="smollm2", messages=QUESTION, stream=True,
                                    options={"temperature": 0, "num_predict": 3}))
    assert parts[-1].done and parts[-1].eval_count == 3
    assert "".join(p.message.content for p in parts).startswith("The")


def test_ollama_generate(ollama_client: ollama.Client) -> None:
    r = ollama_client.generate(model="smollm2", prompt="What is the capital of France? Answer in one word.",
                               options={"temperature": 0, "num_predict": 8, "repeat_penalty": 1.0})
    assert "Paris" in r.response


def test_ollama_listing_endpoints(ollama_client: ollama.Client, bundled_backend: str) -> None:
    assert [m.model for m in ollama_client.list().models] == ["smollm2:latest"]
    assert [m.model for m in ollama_client.ps().models] == ["smollm2:latest"]
    shown = ollama_client.show("smollm2")
    assert shown.modelinfo and shown.modelinfo["llama.context_length"] == 512
    assert httpx.get(bundled_backend + "/api/version").json()["version"]


def test_ollama_unknown_model(ollama_client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model="llama3:70b", messages=QUESTION)
    assert e.value.status_code == 404


@pytest.mark.parametrize("path", ["/api/pull", "/api/create", "/api/push", "/api/delete", "/api/copy"])
def test_no_model_management_endpoints(bundled_backend: str, path: str) -> None:
    r = httpx.post(bundled_backend + path, json={"model": "smollm2"})
    assert r.status_code in (404, 405)


def test_parallel_threads_with_ollama_and_openai(bundled_backend: str, client: openai.OpenAI) -> None:
    oc = ollama.Client(host=bundled_backend)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a = pool.submit(lambda: client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=2, temperature=0))
        b = pool.submit(lambda: oc.chat(model="smollm2", messages=QUESTION, options={"num_predict": 2, "temperature": 0}))
        assert a.result().choices[0].message.content and b.result().message.content


def test_litellm_ollama_chat_provider_works_unchanged(bundled_backend: str) -> None:
    """LiteLLM's own `ollama_chat/` provider, pointed at this backend as if it were Ollama."""
    import os

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    r = litellm.completion(model="ollama_chat/smollm2", api_base=bundled_backend, messages=QUESTION, max_tokens=8,
                           temperature=0, repeat_penalty=1.0)  # Ollama's default, 1.1, turns the answer aside
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.usage.prompt_tokens == 42 and 1 <= r.usage.completion_tokens <= 8
    chunks = list(litellm.completion(model="ollama_chat/smollm2", api_base=bundled_backend, messages=QUESTION,
                                     max_tokens=3, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("The")
