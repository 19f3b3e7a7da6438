"""A reply that has degenerated into repetition: a small model at temperature 0 can loop on one phrase, line
or finding until max_tokens, and a review should stop reading it rather than wait for the end and parse it.

Two shapes are recognised. An exact loop at the end of the text (one span of up to MAX_PERIOD characters written
again and again, as greedy decoding loops) is cheap to check after every chunk of a stream, and never matches a
reply that merely repeats JSON keys: the line numbers differ. Text whose words are mostly runs that recur many
times (numbers counted as one word, so "1. the input is not checked 2. the input is not checked ..." counts) is
checked on a whole reply that did not parse: a findings reply repeats its keys, so it is not asked of one that did.
"""

from __future__ import annotations

import re
from collections import Counter

MAX_PERIOD = 400  # the longest span an exact loop repeats (a finding of JSON is ~150-300 characters)
LOOP_MIN_CHARS = 200  # a loop must cover at least this much text...
LOOP_MIN_REPEATS = 4  # ...and be written at least this many times
NGRAM = 5  # words in a run
NGRAM_MIN_REPEATS = 6  # a run recurs at least this often...
NGRAM_SHARE = 0.6  # ...and such runs cover at least this share of the words
_WORD = re.compile(r"\w+")


def looping_tail(text: str) -> int | None:
    """Where the text's tail starts looping (just after the loop's first copy), or None."""
    n = len(text)
    for period in range(1, min(MAX_PERIOD, n // LOOP_MIN_REPEATS) + 1):
        matched = 0  # characters from the end that equal the one `period` earlier
        while matched < n - period and text[n - 1 - matched] == text[n - 1 - matched - period]:
            matched += 1
        span = matched + period
        if span >= LOOP_MIN_CHARS and span >= LOOP_MIN_REPEATS * period:
            return n - span + period
    return None


def repeated_runs(text: str) -> int | None:
    """Where text made mostly of recurring runs of words starts repeating (the first run's second copy), or None."""
    found = list(_WORD.finditer(text.lower()))
    words = ["0" if w.group().isdigit() else w.group() for w in found]
    if len(words) < NGRAM * NGRAM_MIN_REPEATS:
        return None
    grams = [tuple(words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1)]
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] >= NGRAM_MIN_REPEATS:
            covered[i:i + NGRAM] = [True] * NGRAM
    if sum(covered) < NGRAM_SHARE * len(words):
        return None
    seen: set[tuple[str, ...]] = set()
    for i, gram in enumerate(grams):
        if gram in seen and counts[gram] >= NGRAM_MIN_REPEATS:
            return found[i].start()
        seen.add(gram)
    return None  # unreachable: a run that recurs has a second copy


def repetition(text: str) -> int | None:
    """Where a degenerate repetition starts in `text`, or None when there is none."""
    found = [i for i in (looping_tail(text), repeated_runs(text)) if i is not None]
    return min(found) if found else None
