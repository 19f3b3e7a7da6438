"""Where a request came from, as its usage row records it: the report and the savings page group by it.

Client tools say who they are in the `x-delegate-source` header (the Python API `api`, `delegate ask`
`cli`, `delegate review` `review`, the MCP server `mcp`); the Messages API's rows are `messages`. A
request that says nothing, or something else, counts as `api`: the header is a label for the books,
not a permission, and a client may not invent new ones.
"""

from __future__ import annotations

SOURCES = ("api", "cli", "mcp", "messages", "review")
HEADER = "x-delegate-source"


def source_of(value: str | None) -> str:
    value = (value or "").strip().lower()
    return value if value in SOURCES else "api"
