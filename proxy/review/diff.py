"""Unified diffs: files, hunks, and which line numbers exist on the new side.

`git diff` output is parsed into files and hunks, each line tagged with its new-side line number, so
a review can be split to fit a model's context and every finding can be pinned to a line that exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@(.*)$")


@dataclass
class Hunk:
    header: str
    lines: list[tuple[str, int | None, str]] = field(default_factory=list)  # (kind " +-", new line no., text)

    @property
    def added(self) -> list[int]:
        return [n for kind, n, _ in self.lines if kind == "+" and n is not None]

    @property
    def new_lines(self) -> set[int]:
        return {n for kind, n, _ in self.lines if kind in "+ " and n is not None}

    def numbered(self) -> str:
        """The hunk with new-side line numbers in front, the form the model sees."""
        out = [self.header]
        for kind, n, text in self.lines:
            out.append(f"{n if n is not None else '':>5} {kind}{text}")
        return "\n".join(out)


@dataclass
class FileDiff:
    path: str
    hunks: list[Hunk] = field(default_factory=list)
    binary: bool = False
    deleted: bool = False

    @property
    def new_lines(self) -> set[int]:
        return set().union(*(h.new_lines for h in self.hunks)) if self.hunks else set()

    @property
    def added(self) -> list[int]:
        return [n for h in self.hunks for n in h.added]


def parse(text: str) -> list[FileDiff]:
    """Files and hunks of a unified diff (`git diff`, or plain `diff -u`). Hunk bodies are read by the
    counts in their headers, so a removed line that reads "--- x" is content, not a file header."""
    files: list[FileDiff] = []
    current: FileDiff | None = None
    hunk: Hunk | None = None
    old_left = new_left = new_no = 0
    for line in text.splitlines():
        if hunk is not None and (old_left > 0 or new_left > 0):
            kind, body = (line[:1] or " "), line[1:]
            if kind == "\\":  # "\ No newline at end of file"
                continue
            if kind == "-":
                hunk.lines.append(("-", None, body))
                old_left -= 1
            elif kind == "+":
                hunk.lines.append(("+", new_no, body))
                new_no, new_left = new_no + 1, new_left - 1
            else:
                hunk.lines.append((" ", new_no, body))
                new_no, old_left, new_left = new_no + 1, old_left - 1, new_left - 1
            continue
        hunk = None
        if line.startswith("diff --git "):
            m = re.match(r"diff --git a/(.*) b/(.*)$", line)
            current = FileDiff(m.group(2) if m else line.split()[-1])
            files.append(current)
        elif line.startswith("--- "):
            if current is None or current.hunks:  # a plain `diff -u` has no "diff --git" line per file
                current = FileDiff(line[4:].split("\t")[0].removeprefix("a/"))
                files.append(current)
        elif line.startswith("+++ ") and current is not None:
            target = line[4:].split("\t")[0]
            if target == "/dev/null":
                current.deleted = True
            else:
                current.path = target.removeprefix("b/")
        elif line.startswith(("Binary files ", "GIT binary patch")) and current is not None:
            current.binary = True
        elif (m := _HUNK.match(line)) and current is not None:
            hunk = Hunk(line)
            current.hunks.append(hunk)
            old_left = int(m.group(2)) if m.group(2) is not None else 1
            new_left = int(m.group(4)) if m.group(4) is not None else 1
            new_no = int(m.group(3))
    return files
