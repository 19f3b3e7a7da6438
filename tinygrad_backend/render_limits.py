"""Render limits for untrusted chat templates: a template renders under a budget, or is stopped.

jinja2's sandbox keeps a template from Python's internals but not from running without end or filling
memory (`{{ 'x' * 10**10 }}`, loops in loops, a macro that calls itself twice, text doubled in a loop), so
every render has a budget (RenderLimits): a deadline, a count of steps (loop iterations, calls, filters,
operators, outputs) and a count of the characters of text it makes. Each is checked from inside the sandbox,
before an operation that would make a big value makes it: loops and `~` are rewritten in the template's
syntax tree to pass through a guard (`compile_limited`), and `+ * % **`, calls, filters, str.format and
output go through the environment's hooks (`limited_environment`). `render_limited` runs one render under
its budget; past a limit it raises TemplateLimitError.
"""
from __future__ import annotations

import contextvars
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from string import Formatter
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer


@dataclass(frozen=True)
class RenderLimits:
    """What one render may spend. A real template renders a real chat in well under a millisecond, in a
    few hundred steps, making a few times the messages' size of text; these are orders of magnitude above."""

    seconds: float = 2.0
    steps: int = 1_000_000
    # the longest output, and the longest value a template may make: this plus output_per_input x the
    # characters of the messages and tools
    output_chars: int = 2 << 20
    output_per_input: int = 8
    # all the text a render makes, output and intermediate values together, in multiples of the above
    work_factor: int = 32
    int_bits: int = 4096  # the largest integer a template may compute
    # macro calls (and recursive loops) nested in each other: real templates nest a few; each level is
    # ~10 Python frames, and tinygrad raises Python's recursion limit to 10000
    depth: int = 100


class TemplateError(Exception):
    """The chat template failed to render these messages (the template raised, or is broken)."""


class TemplateLimitError(TemplateError):
    """The chat template went past a render limit (time, steps or size)."""


# --- the budget -------------------------------------------------------------------------------------------


class _Budget:
    __slots__ = ("chars", "clock", "deadline", "depth", "limits", "max_chars", "max_int_bits", "max_steps", "max_value",
                 "steps", "tripped")

    def __init__(self, limits: RenderLimits, input_chars: int) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.max_steps = limits.steps
        self.max_value = limits.output_chars + limits.output_per_input * input_chars
        self.max_chars = limits.work_factor * self.max_value
        self.max_int_bits = limits.int_bits
        self.steps = self.chars = self.depth = 0
        self.clock = 32  # steps to the next look at the clock
        self.tripped: str | None = None

    def trip(self, why: str) -> None:
        self.tripped = self.tripped or why
        raise TemplateLimitError(f"the model's chat template was stopped: it {self.tripped}")

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.tripped or self.steps > self.max_steps:
            self.trip(f"took more than {self.max_steps:,} steps")
        self.clock -= n
        if self.clock <= 0:
            self.clock = 32
            if time.monotonic() > self.deadline:
                self.trip(f"ran for more than {self.limits.seconds:g} s")

    def charge(self, n: int) -> None:
        """Count `n` characters of text the template makes (before it makes them, where it can)."""
        self.chars += n
        if n > self.max_value:
            self.trip(f"made a text of {n:,} characters (at most {self.max_value:,})")
        if self.chars > self.max_chars:
            self.trip(f"made more than {self.max_chars:,} characters of text")

    def check_int(self, n: Any) -> None:
        if isinstance(n, int) and n > self.max_value:
            self.trip(f"asked for a size of {n:,} (at most {self.max_value:,})")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("render_budget", default=None)


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict | set | frozenset) else 0


_CONTAINERS = (list, tuple, set, frozenset, dict, Namespace)


def _children(item: Any) -> list[Any] | tuple[Any, ...] | set[Any] | frozenset[Any] | None:
    if isinstance(item, list | tuple | set | frozenset):
        return item
    if isinstance(item, dict):
        return [*item.keys(), *item.values()]
    if isinstance(item, Namespace):
        attrs = object.__getattribute__(item, "_Namespace__attrs")
        return [*attrs.keys(), *attrs.values()]
    return None


def _scalar_chars(item: Any) -> int:
    if isinstance(item, str | bytes):
        return len(item) + 2
    if isinstance(item, int):
        return item.bit_length() // 3 + 2
    return 24


def _measure(value: Any, budget: _Budget) -> tuple[int, int]:
    """About how many characters str() or json.dumps() of `value` writes (at least 3 an item: `1, `), and
    its depth; trips the budget rather than let them write more than the largest text. A template can
    nest one list in another many times over (`[ns.x, ns.x]` in a loop) in little memory, and str() would
    write every copy out: each distinct list is measured once, so measuring costs what the memory does.
    (A value nested a thousand deep is a RecursionError here, as it would be in str() or json.dumps().)"""
    if not isinstance(value, _CONTAINERS):
        return _scalar_chars(value), 1
    limit = budget.max_value
    memo: dict[int, tuple[int, int]] = {}

    def size(item: Any) -> tuple[int, int]:
        key = id(item)
        known = memo.get(key)
        if known is not None:
            return known
        memo[key] = (8, 1)  # what a cycle back to it costs: repr writes "[...]"
        children = _children(item)
        assert children is not None
        if 2 + 3 * len(children) > limit:
            budget.trip(f"made a text of more than {limit:,} characters")
        chars, depth = 2, 0
        for child in children:
            if type(child) is str:
                chars += len(child) + 4
            elif isinstance(child, _CONTAINERS):
                child_chars, child_depth = size(child)
                chars += child_chars + 2
                depth = max(depth, child_depth)
            else:
                chars += _scalar_chars(child) + 2
            if chars > limit:
                budget.trip(f"made a text of more than {limit:,} characters")
        memo[key] = (chars, depth + 1)
        return chars, depth + 1

    result = size(value)
    budget.step(len(memo) // 16 + 1)
    return result


def _text(value: Any, budget: _Budget) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, int | float | bool | None | jinja2.Undefined):
        _measure(value, budget)
    return str(value)


# --- guards the template's syntax tree is rewritten to call --------------------------------------------------
# They are filters with names no template can write (jinja calls a filter directly, faster than a call
# through the sandbox) that take the context, so jinja never runs them at compile time, where no budget is set.


class _Loop:
    """A for loop's iterable: each iteration is a step, and spends the loop body's literal text."""

    __slots__ = ("budget", "chars", "inner")

    def __init__(self, inner: Any, budget: _Budget, chars: int) -> None:
        self.inner, self.budget, self.chars = inner, budget, chars

    def __iter__(self) -> Iterator[Any]:
        budget, chars = self.budget, self.chars
        for item in self.inner:
            budget.step()
            if chars:
                budget.charge(chars)
            yield item

    def __len__(self) -> int:  # loop.length; a TypeError for an iterator, which LoopContext expects
        return len(self.inner)


@jinja2.pass_context
def _loop(context: Any, iterable: Any, literal_chars: int) -> Any:
    budget = _BUDGET.get()
    return iterable if budget is None else _Loop(iterable, budget, literal_chars)


@jinja2.pass_context
def _concat(context: Any, *parts: Any) -> str:
    """`a ~ b`: jinja's str_join, counted."""
    budget = _BUDGET.get()
    if budget is None:
        return "".join(map(str, parts))
    budget.step()
    texts = [_text(p, budget) for p in parts]
    budget.charge(sum(map(len, texts)))
    return "".join(texts)


def _check_made(budget: _Budget, value: Any) -> None:
    """A list, tuple, dict or namespace the template made: it may hold another many times over
    (`[x, x]`, in a loop), which costs no memory but makes str(), ==, hash() and sort() take exponential
    time, in C, where no deadline reaches. So every container a template makes is measured as str() would
    write it out, which keeps each one at most the size of the largest text."""
    if isinstance(value, _CONTAINERS):
        _measure(value, budget)


@jinja2.pass_context
def _made(context: Any, value: Any) -> Any:
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()
        budget.charge(_size(value))
        _check_made(budget, value)
    return value


def _finalize(value: Any) -> Any:
    """Every `{{ ... }}` output: counted, and a nested list measured before str() writes it out."""
    budget = _BUDGET.get()
    if budget is None or isinstance(value, jinja2.Undefined):
        return value
    text = value if type(value) is str else _text(value, budget)
    budget.steps += 1
    budget.chars += len(text)
    if len(text) > budget.max_value or budget.chars > budget.max_chars or budget.steps > budget.max_steps:
        budget.step()
        budget.charge(len(text))
    return text


_GUARDS = {"delegate:loop": _loop, "delegate:concat": _concat, "delegate:made": _made}


def _guard(name: str, node: nodes.Node, *args: nodes.Node) -> nodes.Node:
    return nodes.Filter(node, f"delegate:{name}", list(args), [], None, None).set_lineno(node.lineno or 1)


class _Guard(NodeTransformer):
    """Rewrites the template: loops, `~` and list, tuple and dict literals pass through a guard."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        literal = sum(len(d.data) for d in node.find_all(nodes.TemplateData))
        node.iter = _guard("loop", node.iter, nodes.Const(literal))
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _guard("concat", *node.nodes)

    def visit_List(self, node: nodes.List) -> nodes.Node:
        self.generic_visit(node)
        return _guard("made", node)

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        self.generic_visit(node)
        return _guard("made", node) if node.ctx == "load" else node

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        self.generic_visit(node)
        for pair in node.items:
            pair.key = _guard("made", pair.key)  # type: ignore[assignment]  # hashed as the dict is made
        return _guard("made", node)


# --- size checks of operations that take a size ----------------------------------------------------------------

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent(budget: _Budget, fmt: str | bytes, args: Any) -> None:
    """`fmt % args`: no width or precision past the limit."""
    text = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    star = False
    for width, precision in _PERCENT_SPEC.findall(text):
        for n in (width, precision):
            star = star or n == "*"
            if n.isdigit():
                budget.check_int(int(n))
    values = args if isinstance(args, tuple) else (args,)
    if star:
        for v in values:
            budget.check_int(v)
    for v in values:
        _text(v, budget)


def _check_format(budget: _Budget, fmt: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """`fmt.format(...)`: no width or precision past the limit, nor one taken from an argument."""
    nested = False
    for _, _, spec, _ in Formatter().parse(fmt):
        if spec:
            nested = nested or "{" in spec
            for n in re.findall(r"\d+", spec):
                budget.check_int(int(n))
    values = [*args, *kwargs.values()]
    for v in values:
        if nested:
            budget.check_int(v)
        _text(v, budget)


def _replace_size(text: str | bytes, old: Any, new: Any, count: Any) -> int:
    if not isinstance(old, str | bytes) or not isinstance(new, str | bytes) or type(old) is not type(text):
        return len(text)
    hits = text.count(old)  # type: ignore[arg-type]
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * max(0, len(new) - len(old))


def _check_method(budget: _Budget, method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """A call of a str, bytes or int method that takes a size; returns the arguments to call it with."""
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if isinstance(owner, str | bytes):
        first = args[0] if args else None
        if name in ("center", "ljust", "rjust", "zfill"):
            budget.check_int(first if args else kwargs.get("width"))
        elif name == "expandtabs":
            size = first if args else kwargs.get("tabsize", 8)
            tab: Any = "\t" if isinstance(owner, str) else b"\t"
            if isinstance(size, int):
                budget.charge(len(owner) + max(size, 0) * owner.count(tab))
        elif name == "replace" and len(args) >= 2:
            budget.charge(_replace_size(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count")))
        elif name == "join" and args:
            items = list(args[0])
            budget.step(len(items) // 64 + 1)
            budget.charge(len(owner) * max(len(items) - 1, 0) + sum(_size(i) for i in items))
            args = (items, *args[1:])
        elif name == "translate" and isinstance(first, dict):
            longest = max((_size(v) for v in first.values()), default=1)
            budget.charge(len(owner) * max(longest, 1))
    elif isinstance(owner, int) and name == "to_bytes":
        budget.check_int(args[0] if args else kwargs.get("length", 1))
    return args


def _check_center(budget: _Budget, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    budget.check_int(args[0] if args else kwargs.get("width", 80))


def _check_indent(budget: _Budget, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    width = args[0] if args else kwargs.get("width", 4)
    pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    budget.check_int(pad)
    text = _text(value, budget)
    budget.charge(len(text) + max(pad, 0) * (text.count("\n") + 1))


def _check_wordwrap(budget: _Budget, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring")
    budget.charge(len(_text(value, budget)) * (1 + (len(wrap) if isinstance(wrap, str) else 1)))


def _check_replace(budget: _Budget, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if len(args) >= 2:
        budget.charge(_replace_size(_text(value, budget), args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count")))


def _check_format_filter(budget: _Budget, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if isinstance(value, str):
        _check_percent(budget, value, args or kwargs)


def _check_join(budget: _Budget, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    sep = args[0] if args else kwargs.get("d", "")
    count = len(value) if isinstance(value, list | tuple | str) else 0
    budget.charge(len(_text(sep, budget)) * max(count - 1, 0))


def _check_sum(budget: _Budget, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """sum() of lists copies the total so far at each item: quadratic in the items."""
    if not isinstance(value, list | tuple):
        return
    start = args[1] if len(args) > 1 else kwargs.get("start", 0)
    sizes = [_size(v) for v in value]
    if _size(start) or any(sizes):
        total, copied = _size(start), 0
        for size in sizes:
            total += size
            copied += total
            if copied > budget.max_chars:
                break
        budget.charge(min(copied, budget.max_chars + 1))


def _check_fill(budget: _Budget, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    budget.check_int(args[0] if args else None)  # batch(linecount) pads, slice(slices) makes that many lists


def _check_tojson(budget: _Budget, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    # without an indent the text is about as long as the value measured when it was made (the messages and
    # tools are trees, as long as the request); an indent writes itself once per level on every line
    indent = args[0] if args else kwargs.get("indent")
    pad = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    if pad > 0:
        budget.check_int(pad)
        chars, depth = _measure(value, budget)
        budget.charge(chars * (1 + pad * depth))


_FILTER_CHECKS: dict[str, Callable[[_Budget, Any, tuple[Any, ...], dict[str, Any]], None]] = {
    "center": _check_center, "indent": _check_indent, "wordwrap": _check_wordwrap, "replace": _check_replace,
    "format": _check_format_filter, "join": _check_join, "sum": _check_sum, "batch": _check_fill, "slice": _check_fill,
    "tojson": _check_tojson,
}
# filters that write their value out as text: a nested value is measured first
_TEXT_FILTERS = frozenset({
    "string", "pprint", "join", "trim", "truncate", "title", "capitalize", "upper", "lower", "striptags", "urlize",
    "urlencode", "escape", "e", "forceescape", "safe", "wordcount", "xmlattr", "center", "indent", "wordwrap",
    "replace", "format",
})


def _guarded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func`, counted and size-checked. It takes the context, so jinja never runs it at compile time
    (where no budget is set: it folds a filter of constants into a constant)."""
    pass_arg = getattr(func, "jinja_pass_arg", None)
    kind = pass_arg.name if pass_arg is not None else None
    check = _FILTER_CHECKS.get(name)
    text = name in _TEXT_FILTERS
    listify = name in ("join", "sum")

    @jinja2.pass_context
    def guarded(context: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.step()
            if type(value) is not str:
                if listify and not isinstance(value, list | tuple | str):
                    value = list(value)  # a generator, measured, then used
                if text:
                    _measure(value, budget)
            if check is not None:
                check(budget, value, args, kwargs)
        if kind == "context":
            result = func(context, value, *args, **kwargs)
        elif kind == "eval_context":
            result = func(context.eval_ctx, value, *args, **kwargs)
        elif kind == "environment":
            result = func(context.environment, value, *args, **kwargs)
        else:
            result = func(value, *args, **kwargs)
        if budget is not None:
            if type(result) is str:
                budget.charge(len(result))
            else:
                budget.charge(_size(result))
                _check_made(budget, result)
        return result

    return guarded


class _Environment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every operation that can take long or make a big value counted."""

    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None and operator == "+" and type(left) is str and type(right) is str:
            # the fast path: templates join their text with `+`, dozens of times a render
            n = len(left) + len(right)
            budget.steps += 1
            budget.chars += n
            if n > budget.max_value or budget.chars > budget.max_chars or budget.steps > budget.max_steps:
                budget.step()
                budget.charge(n)
            return left + right
        if budget is not None:
            budget.step()
            if operator == "+":
                if isinstance(left, str | bytes | list | tuple) and isinstance(right, str | bytes | list | tuple):
                    budget.charge(len(left) + len(right))
            elif operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, str | bytes | list | tuple) and isinstance(n, int):
                    budget.charge(len(seq) * max(n, 0))
                elif isinstance(seq, int) and isinstance(n, int) and seq.bit_length() + n.bit_length() > budget.max_int_bits:
                    budget.trip(f"multiplied integers past {budget.max_int_bits} bits")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 \
                        and (left.bit_length() - 1) * right > budget.max_int_bits:
                    budget.trip(f"raised an integer past {budget.max_int_bits} bits")
            elif operator == "%" and isinstance(left, str | bytes):
                _check_percent(budget, left, right)
        result = self.binop_table[operator](left, right)
        if budget is not None:
            if operator == "%":
                budget.charge(_size(result))
            elif isinstance(result, list | tuple):
                _check_made(budget, result)
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is None:
            return super().call(__context, __obj, *args, **kwargs)
        budget.step()
        args = _check_method(budget, __obj, args, kwargs)
        for arg in (*args, *kwargs.values()):  # a macro's varargs and kwargs are made of them
            _check_made(budget, arg)
        budget.depth += 1
        if budget.depth > budget.limits.depth:
            budget.trip(f"nested calls more than {budget.limits.depth} deep")
        try:
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        budget.charge(_size(result))
        _check_made(budget, result)
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        def guarded(*args: Any, **kwargs: Any) -> str:
            budget = _BUDGET.get()
            if budget is not None:
                budget.step()
                mapping = args[0] if is_map and args and isinstance(args[0], dict) else {}
                _check_format(budget, fmt, () if is_map else args, mapping if is_map else kwargs)
            result = wrapper(*args, **kwargs)
            if budget is not None:
                budget.charge(len(result))
            return result

        return guarded


def _walk_chars(value: Any) -> int:
    chars, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return chars


def _input_chars(messages: list[dict[str, Any]], tools: Any, *texts: str) -> int:
    """The characters of the messages and tools, which the limits grow with."""
    chars = sum(map(len, texts))
    for message in messages:
        if not isinstance(message, dict):
            chars += _walk_chars(message)
            continue
        for key, value in message.items():
            chars += len(key) + (len(value) if type(value) is str else _walk_chars(value))
    if tools:
        try:
            chars += len(json.dumps(tools, default=str))
        except (TypeError, ValueError, RecursionError):
            chars += _walk_chars(tools)
    return chars


def limited_environment(filters: dict[str, Callable[..., Any]], globals_: dict[str, Any], **options: Any) -> _Environment:
    """jinja2's immutable sandbox with every hook of the budget in place; `filters` and `globals_` are added
    (filters are guarded like jinja's own)."""
    env = _Environment(finalize=_finalize, **options)
    env.filters.update(filters)
    env.filters = {name: _guarded_filter(name, f) for name, f in env.filters.items()} | _GUARDS
    env.globals.pop("lipsum", None)  # lipsum(n=10**9) writes a billion paragraphs; no template uses it
    env.globals.update(globals_)
    return env


def compile_limited(env: _Environment, source: str) -> jinja2.Template:
    """The template with its loops and `~` rewritten to pass through the budget's guards."""
    tree = _Guard().visit(env.parse(source))
    tree.set_environment(env)
    return env.from_string(tree)


def render_limited(template: jinja2.Template, limits: RenderLimits, input_texts: tuple[Any, ...],
                   **context: Any) -> str:
    """One render under a budget that grows with `input_texts` (the messages, the tools, ...). Raises
    TemplateLimitError past a limit; what the template itself raises passes through."""
    messages, tools, *texts = input_texts
    budget = _Budget(limits, _input_chars(messages, tools, *texts))
    token = _BUDGET.set(budget)
    parts: list[str] = []
    written = 0
    try:
        for part in template.generate(**context):
            written += len(part)
            if written > budget.max_value:
                budget.trip(f"wrote more than {budget.max_value:,} characters")
            parts.append(part)
    finally:
        _BUDGET.reset(token)
    if budget.tripped:  # a limit was hit, and the error swallowed somewhere inside jinja
        raise TemplateLimitError(f"the model's chat template was stopped: it {budget.tripped}")
    return "".join(parts)
