"""bench-backend's constrained-decoding figures, in process: decode held to a JSON schema against free, the
grammar's mask and compile times, and how many answers over the test schema set parse and validate."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

CONSTRAINED_TOKENS = 128


def constrained_decoding(model_path: Path, weights: str, chat_prompt: Callable[[str], str]) -> dict[str, float]:
    """Greedy decode tokens/s held to a JSON schema against free, on the same model and prompt; llguidance's mask
    time per token (on its worker, overlapping the forward pass) and schema compile time; and the share of answers
    over tests/tinygrad_backend/test_structured.py's schema set that parse and validate."""
    import jsonschema

    from tests.tinygrad_backend.test_structured import SCHEMAS
    from tinygrad_backend.constraints import Grammars
    from tinygrad_backend.gguf_file import read_header
    from tinygrad_backend.model import Model
    from tinygrad_backend.sampling import SamplingParams, pick_token
    from tinygrad_backend.tokenizer import GGUFTokenizer

    header = read_header(model_path)
    tok = GGUFTokenizer(header.metadata)
    model = Model(header, 2048, progress=lambda s: None, weights=weights)
    model.warm_up(progress=lambda s: None)
    grammars = Grammars(tok)
    start = time.perf_counter()
    grammars.json_schema(None)  # the first compile also builds llguidance's tokenizer from the vocabulary
    result: dict[str, float] = {"grammar_tokenizer_s": time.perf_counter() - start}
    compiles = []
    for schema in list(SCHEMAS.values()) * 5:
        start = time.perf_counter()
        grammars.json_schema(schema)
        compiles.append(time.perf_counter() - start)
    result["compile_ms"] = statistics.median(compiles) * 1000
    result["compile_max_ms"] = max(compiles) * 1000
    prompt = tok.encode(chat_prompt("Describe three people as JSON: their names, ages, pets and cities."))
    schema = {"type": "array", "items": SCHEMAS["nested object"]}  # long enough for the whole run
    greedy = SamplingParams(temperature=0)
    rng = np.random.default_rng(0)

    def run(constrained: bool) -> tuple[float, float, int]:
        model.forget()
        seq = list(prompt)
        constraint = grammars.json_schema(schema) if constrained else None
        if constraint is not None:
            constraint.prepare()
        logits = model.next_logits(seq)
        start, masked = time.perf_counter(), 0
        for _ in range(CONSTRAINED_TOKENS):
            allowed = constraint.allowed() if constraint is not None else None
            token = pick_token(logits, greedy, rng, seq, allowed)
            if constraint is not None:
                constraint.accept(token)  # the next mask starts here, beside the forward pass below
                if constraint.done:  # the array closed early: start another, the speed is what is measured
                    masked += constraint.tokens
                    result["mask_s"] = result.get("mask_s", 0.0) + constraint.mask_seconds
                    constraint = grammars.json_schema(schema)
                    constraint.prepare()
            seq.append(token)
            logits = model.next_logits(seq)
        elapsed = time.perf_counter() - start
        if constraint is not None:
            constraint.close()
            masked += constraint.tokens
            result["mask_s"] = result.get("mask_s", 0.0) + constraint.mask_seconds
        return CONSTRAINED_TOKENS / elapsed, elapsed, masked

    free = [run(False)[0] for _ in range(3)]
    result["mask_s"] = 0.0
    held = [run(True) for _ in range(3)]
    result["free_tps"] = statistics.median(free)
    result["constrained_tps"] = statistics.median(h[0] for h in held)
    result["mask_us_per_token"] = result["mask_s"] / sum(h[2] for h in held) * 1e6
    valid = 0
    for i, (name, one) in enumerate(SCHEMAS.items()):
        for seed in range(3):
            model.forget()
            seq = tok.encode(chat_prompt(f"Describe a person as JSON ({name})."))
            constraint = grammars.json_schema(one)
            sampler = SamplingParams(temperature=0.8, top_k=40, seed=seed)
            draws = np.random.default_rng(seed * 100 + i)
            for _ in range(CONSTRAINED_TOKENS):
                token = pick_token(model.next_logits(seq), sampler, draws, seq, constraint.allowed())
                if token in tok.end_ids:
                    break
                constraint.accept(token)
                seq.append(token)
                if constraint.done:
                    break
            constraint.close()
            try:
                jsonschema.validate(json.loads(tok.decode(seq[len(seq) - constraint.tokens:])), one)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
    result["valid"], result["valid_of"] = valid, len(SCHEMAS) * 3
    return result


def render_constrained(c: dict[str, float]) -> str:
    ratio = c["constrained_tps"] / c["free_tps"]
    verdict = "met" if ratio >= 0.9 else "not met"
    stretch = "met" if ratio >= 0.97 else "not met"
    return "\n".join([
        "", "### Constrained decoding (llguidance, in process)", "",
        "| measure | value |", "| --- | --- |",
        f"| greedy decode tokens/s, free ({CONSTRAINED_TOKENS} tokens, median of 3) | {c['free_tps']:.1f} |",
        f"| greedy decode tokens/s, held to a JSON schema | {c['constrained_tps']:.1f} |",
        f"| constrained / free | {ratio:.3f}x |",
        f"| mask time per token, on the mask worker (us) | {c['mask_us_per_token']:.0f} |",
        f"| schema compile time, median / max over the schema set (ms) | {c['compile_ms']:.2f} / {c['compile_max_ms']:.2f} |",
        f"| llguidance tokenizer from the vocabulary, once (s) | {c['grammar_tokenizer_s']:.2f} |",
        f"| answers that parse and validate, schema set x 3 seeds, temperature 0.8 | {c['valid']}/{c['valid_of']} |",
        "", f"Targets: constrained >= 0.9x free: {verdict}; stretch >= 0.97x: {stretch} ({ratio:.3f}x); "
        f"validity 100%: {'met' if c['valid'] == c['valid_of'] else 'not met'}.", "",
    ])
