from __future__ import annotations

import pytest

from tinygrad_backend.chat_template import ChatTemplate, TemplateError

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


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
