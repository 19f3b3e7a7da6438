"""The tables the client commands print (`delegate models`, `status`, `keys list`): rich is imported only when
one is printed, so `--json` and `--help` never load it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
    from rich.table import Table

    out = Table(title=title)
    for name in columns:
        out.add_column(name)
    for row in rows:
        out.add_row(*row)
    return out
