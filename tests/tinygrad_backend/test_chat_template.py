from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tinygrad_backend.chat_template import ChatTemplate, RenderLimits, TemplateError, TemplateLimitError

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Qwen2.5-Instruct's template (tokenizer_config.json), as its GGUFs carry it
DATA = Path(__file__).parent / "data"  # the models' own templates, as their GGUFs carry them
QWEN25 = (DATA / "qwen2.5_chat_template.jinja").read_text()

# Llama 3.1/3.2-Instruct's template
LLAMA31 = (DATA / "llama3.1_chat_template.jinja").read_text()


def test_renders_the_models_own_template() -> None:
    text = ChatTemplate(SMOLLM2).render([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_falls_back_to_chatml_without_a_template() -> None:
    template = ChatTemplate(None)
    assert template.is_fallback
    assert template.render([{"role": "user", "content": "Hi"}]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_bos_and_tools_reach_the_template() -> None:
    template = ChatTemplate("{{ bos_token }}{% if tools %}{{ tools | tojson }}{% endif %}{{ messages[0]['content'] }}",
                            bos_token="<s>")
    assert template.render([{"role": "user", "content": "x"}], tools=[{"name": "f"}]) == '<s>[{"name": "f"}]x'


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set _ = messages.append({'role': 'x'}) %}{{ messages }}",
])
def test_sandbox_refuses_escapes_and_mutation(source: str) -> None:
    with pytest.raises(TemplateError):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_raise_exception_in_template_is_a_template_error() -> None:
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        template.render([{"role": "user", "content": "x"}])


def test_broken_template_does_not_compile() -> None:
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


# --- the real templates render as plain jinja renders them ---------------------------------------------------

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_TURN = [*CHAT, {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": "18 C, sunny"}]


def _reference(source: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """The template rendered by plain jinja2, as transformers does: what ChatTemplate must equal."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda v, indent=None: __import__("json").dumps(v, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(ValueError(m))
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    return env.from_string(source).render(messages=messages, tools=tools, add_generation_prompt=True, bos_token="<s>",
                                          eos_token="</s>")


@pytest.mark.parametrize("source", [SMOLLM2, QWEN25, LLAMA31, None], ids=["smollm2", "qwen2.5", "llama3.1", "chatml"])
@pytest.mark.parametrize(("messages", "tools"), [(CHAT, None), (CHAT, TOOLS), (TOOL_TURN, TOOLS)],
                         ids=["chat", "tools", "tool-calls"])
def test_real_templates_render_as_plain_jinja_does(source: str | None, messages: list[dict[str, Any]],
                                                   tools: list[dict[str, Any]] | None) -> None:
    if source is None and tools:
        pytest.skip("ChatML knows no tools")
    got = ChatTemplate(source, "<s>", "</s>").render(messages, tools=tools)
    assert got == _reference(source or ChatTemplate(None).source, messages, tools)


def test_qwen_template_output() -> None:
    text = ChatTemplate(QWEN25).render(TOOL_TURN, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert text.endswith("<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_long_chats_are_within_the_limits() -> None:
    """The limits grow with the input: 300 messages of 8 KB (2.4 MB, past the 2 MiB base) render."""
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 1600} for i in range(300)]
    for source in (SMOLLM2, QWEN25, LLAMA31):
        assert len(ChatTemplate(source).render(chat)) > 300 * 8000


# --- render limits: a template that loops or allocates without bound is stopped -------------------------------

MSG = [{"role": "user", "content": "x"}]

HOSTILE = {
    # loops
    "a range of a billion": ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
    "loops in loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                       "took more than 1,000,000 steps"),
    "a loop over a long string": ("{% for a in 'x' * 1000000 %}{% for b in 'x' * 1000000 %}{% endfor %}{% endfor %}",
                                  "took more than"),
    "a macro that calls itself": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "nested calls more than 100 deep"),
    "a macro that calls itself twice": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                                        "{{ f(60) }}", "took more than 1,000,000 steps|ran for more than 2 s"),
    "a recursive loop over itself": ("{% set items = [1, 2] %}{% for i in items recursive %}{{ loop(items) }}{% endfor %}",
                                     "nested calls more than 100 deep"),
    # one big value
    "a string times 10**10": ("{{ 'x' * 10**10 }}", "made a text of 10,000,000,000 characters"),
    "a list times 10**9": ("{{ ([0] * 10**9) | length }}", "made a text of 1,000,000,000 characters"),
    "a huge power": ("{{ 7 ** 100000000 > 1 }}", "raised an integer past 4096 bits"),
    "a huge product": ("{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
                       "multiplied integers past 4096 bits"),
    "center(10**9)": ("{{ 'x' | center(10**9) }}", "asked for a size of 1,000,000,000"),
    "str.center(10**9)": ("{{ 'x'.center(10**9) }}", "asked for a size of 1,000,000,000"),
    "indent of many lines": ("{{ ('x\n' * 1000000) | indent(1000) }}", "made a text of"),
    "a %-format width": ("{{ '%.100000000f' % 1.0 }}", "asked for a size of 100,000,000"),
    "a %-format star width": ("{{ '%*s' % (10**9, 'x') }}", "asked for a size of 1,000,000,000"),
    "a format width": ("{{ '{:>100000000}'.format('x') }}", "asked for a size of 100,000,000"),
    "a nested format width": ("{{ '{:>{}}'.format('x', 10**9) }}", "asked for a size of 1,000,000,000"),
    "format filter width": ("{{ '%100000000s' | format('x') }}", "asked for a size of 100,000,000"),
    "replace of the empty string": ("{{ ('a' * 100).replace('', 'x' * 1000000) }}", "made a text of"),
    "replace filter": ("{{ ('a' * 100) | replace('', 'x' * 1000000) }}", "made a text of"),
    "join with a long separator": ("{{ ('x' * 1000000).join(range(1000) | map('string')) }}", "made a text of"),
    "join filter with a long separator": ("{{ range(1000) | join('x' * 1000000) }}", "made a text of"),
    "to_bytes(10**9)": ("{{ (1).to_bytes(10**9, 'big') | length }}", "asked for a size of 1,000,000,000"),
    "tojson indent 10**9": ("{{ [[1]] | tojson(indent=10**9) }}", "asked for a size of 1,000,000,000"),
    "batch padding": ("{{ [1] | batch(10**9, 0) | list | length }}", "asked for a size of 1,000,000,000"),
    "expandtabs": ("{{ ('\t' * 1000000).expandtabs(1000) }}", "made a text of"),
    "lipsum": ("{{ lipsum(n=10**6) }}", "lipsum' is undefined"),
    # text grown step by step
    "a string doubled in a loop": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                                   "{% endfor %}{{ ns.s | length }}", "made a text of"),
    "a string doubled with ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                                "{% endfor %}{{ ns.s | length }}", "made a text of"),
    "a string doubled by recursion": ("{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}"
                                      "{{ f('x', 64) }}", "made a text of"),
    "a list that holds itself twice": ("{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}"
                                       "{% endfor %}{{ ns.l }}", "made a text of more than"),
    "a nested list to json": ("{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}"
                              "{% endfor %}{{ ns.l | tojson }}", "made a text of more than"),
    "a nested list joined": ("{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}"
                             "{% endfor %}{{ ns.l | join }}", "made a text of more than"),
    "lots of output": ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "made more than|wrote more than"),
    "literal text in a loop in a macro": ("{% macro f() %}{% for i in range(100000) %}" + "y" * 1000 + "{% endfor %}"
                                          "{% endmacro %}{% for j in range(100) %}{{ f() | length }}{% endfor %}",
                                          "made more than"),
    # errors the template's own Python raises
    "division by zero": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "a float overflow": ("{{ 10.0 ** 1000 }}", "OverflowError"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_template_is_stopped_with_a_template_error(case: str) -> None:
    source, message = HOSTILE[case]
    template = ChatTemplate(source)  # compiles at once: no constant is folded at compile time
    start = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError, match=message) as raised:
            template.render(MSG)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 10, "stopped, but late"
    assert peak < 100 << 20, f"stopped, but after allocating {peak:,} bytes"
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 400


def test_a_limit_is_a_template_error_the_server_answers_400() -> None:
    assert issubclass(TemplateLimitError, TemplateError)  # service.chat_prompt turns TemplateError into a 400
    with pytest.raises(TemplateLimitError, match="took more than 1,000,000 steps"):
        ChatTemplate(HOSTILE["loops in loops"][0]).render(MSG)


def test_the_deadline_stops_a_slow_render() -> None:
    limits = RenderLimits(seconds=0.05, steps=10**12)
    start = time.monotonic()
    with pytest.raises(TemplateLimitError, match="ran for more than 0.05 s"):
        ChatTemplate(HOSTILE["loops in loops"][0], limits=limits).render(MSG)
    assert time.monotonic() - start < 1


def test_the_next_render_has_a_fresh_budget() -> None:
    template = ChatTemplate("{% for i in range(n) %}{% for j in range(1000) %}{% endfor %}{% endfor %}ok")
    with pytest.raises(TemplateLimitError):
        template._template.environment.globals["n"] = 2000
        template.render(MSG)
    template._template.environment.globals["n"] = 900
    assert template.render(MSG) == "ok"  # 900k steps: under the limit when counted from zero


def test_deeply_nested_messages_are_a_template_error() -> None:
    """Python's own recursion limit still stops what the call depth does not count: here str() of the input."""
    deep: Any = "x"
    for _ in range(50_000):
        deep = [deep]
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages }}").render([{"role": "user", "content": deep}])


def test_a_template_that_nests_too_deeply_to_compile() -> None:
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}")


def test_errors_from_the_template_are_short() -> None:
    with pytest.raises(TemplateError) as raised:
        ChatTemplate("{{ raise_exception('x' * 100000) }}").render(MSG)
    assert len(str(raised.value)) <= 1000
    with pytest.raises(TemplateError, match="KeyError") as raised:
        ChatTemplate("{{ ('{' ~ 'k' * 100000 ~ '}').format() }}").render(MSG)
    assert len(str(raised.value)) < 400


def test_constant_folding_cannot_bomb_the_compile() -> None:
    """jinja evaluates constant expressions when it compiles; these would allocate gigabytes at start-up."""
    start = time.monotonic()
    for source in ("{{ 'x' * 10**10 }}", "{{ 'x' | center(10**10) }}", "{{ 10 ** 10 ** 10 }}", "{{ 'a' ~ 'x' * 10**10 }}"):
        ChatTemplate(source)
    assert time.monotonic() - start < 2


FEATURES = [
    "{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ ',' if not loop.last }}{% endfor %}",
    "{% for m in messages if m.role == 'user' %}{{ m.content ~ '!' ~ loop.revindex }}{% else %}none{% endfor %}",
    "{% for m in messages | reverse %}{{ m.role | upper }}{% endfor %}{{ messages | map(attribute='role') | join('+') }}",
    "{% set ns = namespace(n=0, s='') %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% set ns.s = ns.s + m.role %}"
    "{% endfor %}{{ ns.n }} {{ ns.s }} {{ ns.s * 2 }} {{ '%s-%03d' % (ns.s, ns.n) }} {{ '{}:{:>4}'.format('a', 7) }}",
    "{% macro box(x) %}[{{ x }}{{ caller() if caller }}]{% endmacro %}{{ box('a') }}{% call box('b') %}c{% endcall %}",
    "{% set tree = [{'n': 1, 'c': [{'n': 2, 'c': []}]}] %}{% for t in tree recursive %}{{ t.n }}{{ loop(t.c) }}{% endfor %}",
    "{{ messages | selectattr('role', 'equalto', 'user') | list | length }} {{ range(7) | batch(3, 0) | list }}"
    " {{ range(5) | slice(2) | list }} {{ {'b': 1, 'a': 2} | dictsort }} {{ [3, 1, 2] | sort | join(',') }}",
    "{{ 'a\\nb' | indent(2, true) }} {{ 'x' | center(5) }} {{ 'abc' | replace('b', 'xx') }} {{ 'a b c' | wordcount }}"
    " {{ 'hello world' | title | truncate(8, true, '..') }} {{ ' x ' | trim }} {{ '%d items' | format(3) }}",
    "{{ messages | tojson }} {{ tools | tojson(indent=2) }} {{ messages[0] }} {{ [1, [2, (3, 4)]] }} {{ none }} {{ 2 ** 10 }}",
    "{{ 'x'.ljust(3, '.') }}{{ 'a\\tb'.expandtabs(4) }}{{ '-'.join(['a', 'b']) }}{{ 'ab'.replace('', '.') }}"
    "{{ 'abc'.split('b') }}{{ (255).to_bytes(2, 'big') | list }}{{ 7 * 6 }}{{ [1] * 3 }}{{ 10 % 3 }}",
    "{% filter upper %}{% for m in messages %}{{ m.content }}{% endfor %}{% endfilter %}"
    "{% set x %}{{ 1 + 1 }}{% endset %}{{ x }}",
    "{% for i in range(3) %}{% for j in range(2) %}{% if j == 1 %}{% break %}{% endif %}{{ i }}{{ j }}{% endfor %}{% endfor %}",
]


@pytest.mark.parametrize("source", FEATURES)
def test_guards_do_not_change_what_a_template_writes(source: str) -> None:
    assert ChatTemplate(source, "<s>", "</s>").render(CHAT, tools=TOOLS) == _reference(source, CHAT, TOOLS)
