"""The Jinja sandbox chat templates run in: transformers' environment, and a time and size budget.

Templates come from model folders, ``--chat-template`` or (when an operator allows it) requests, so
they are untrusted code. Jinja's ``ImmutableSandboxedEnvironment`` already stops file access,
imports and ``__class__``/``__globals__`` walks; on top of it every render has

- a deadline, checked on every loop iteration, call, attribute or item lookup, filter, operator and
  output expression, so nested loops or runaway recursion end with :class:`LimitExceeded`;
- a size cap on the output and on every string or list the template builds, checked *before* the
  operations that could allocate far more than their inputs (``*``, ``**``, ``%``, ``~``, padding
  methods and filters, ``join``, ``replace``), so doubling or repetition cannot exhaust memory.

What it cannot stop is a single C-level operation that is slow without allocating (sorting a list
of 10^5 aliases of a 10^5-long list, say): accept templates from requests only if you trust them.

The environment matches transformers' (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, the
``{% generation %}`` tag, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII,
a ``namespace`` that refuses underscore names) so templates render byte-for-byte the same.
Turning a template and a conversation into a prompt is ``pied/chat_template.py``'s.
"""

from __future__ import annotations

import functools
import json
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from datetime import datetime
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.nodes as nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MAX_OUTPUT_CHARS = 16 * 1024 * 1024
# Lists a template builds stay far smaller than strings: each item costs a pointer or more.
MAX_LIST_ITEMS = 1_000_000
# Widths of padding filters and methods, and batch/slice counts (jinja's own range limit).
MAX_WIDTH = 100_000
MAX_JSON_INDENT = 64
MAX_POWER_BITS = 65_536


class LimitExceeded(Exception):
    """Raised inside a render; deliberately not a ValueError or TypeError, which some filters catch."""


class TemplateRaised(TemplateError):
    """``raise_exception(message)`` from a template: the message is meant for the user as is."""


class _Limits(NamedTuple):
    deadline: float
    timeout_s: float
    max_chars: int


# The budget of the render in progress on this thread or task (None outside a render).
_LIMITS: ContextVar[_Limits | None] = ContextVar("pied_chat_template_limits", default=None)


# ---------------------------------------------------------------- budget checks


def _check_time() -> None:
    limits = _LIMITS.get()
    if limits is not None and time.monotonic() > limits.deadline:
        raise LimitExceeded(f"rendering the chat template took longer than {limits.timeout_s:g} s.")


def _max_chars() -> int:
    limits = _LIMITS.get()
    return DEFAULT_MAX_OUTPUT_CHARS if limits is None else limits.max_chars


def _too_big(what: str, size: int, limit: int) -> LimitExceeded:
    return LimitExceeded(f"the chat template built {what} of size {size}, more than the limit of {limit}.")


_CONTAINERS = (list, tuple, set, frozenset, Mapping)


def _estimated_str_len(value: Any, limit: int) -> int:
    """Roughly ``len(str(value))`` without building it; stops once past ``limit``. Containers are
    measured once each, so ``[big] * n`` costs one look at ``big``, not ``n``."""
    if isinstance(value, str):
        return len(value)
    sizes: dict[int, int] = {}

    def measure(item: Any) -> int:
        if isinstance(item, str):
            return len(item) + 2
        if not isinstance(item, _CONTAINERS):
            return 8
        key = id(item)
        if key in sizes:
            return sizes[key]
        sizes[key] = limit + 1  # a container inside itself counts as too big
        children = [*item.keys(), *item.values()] if isinstance(item, Mapping) else list(item)
        # Comprehensions keep the common flat case (strings and numbers) fast.
        total = 2 + 10 * len(children) + sum([len(child) for child in children if isinstance(child, str)])
        for child in [child for child in children if isinstance(child, _CONTAINERS)]:
            if total > limit:
                break
            total += measure(child)
        sizes[key] = total
        return total

    return measure(value)


def _check_str_size(value: Any, what: str = "a string") -> None:
    limit = _max_chars()
    size = _estimated_str_len(value, limit)
    if size > limit:
        raise _too_big(what, size, limit)


def _check_result(value: Any) -> Any:
    """Reject a finished string or container past the caps (after the operation built it: used
    where an operation's output is at most a small multiple of its already-checked inputs)."""
    if isinstance(value, str):
        if len(value) > _max_chars():
            raise _too_big("a string", len(value), _max_chars())
    elif isinstance(value, (list, tuple, dict, set)):
        if len(value) > MAX_LIST_ITEMS:
            raise _too_big("a list", len(value), MAX_LIST_ITEMS)
    return value


def _check_width(width: Any, what: str, limit: int = MAX_WIDTH) -> None:
    if isinstance(width, int) and abs(width) > limit:
        raise LimitExceeded(
            f"the chat template asked for a {what} of {width}, more than the limit of {limit}."
        )


_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


def _check_printf(format_string: str, arguments: Any) -> None:
    """``format_string % arguments``: widths and precisions (literal or ``*``) within the caps."""
    star = False
    for width, precision in _PRINTF_SPEC.findall(format_string):
        for number in (width, precision):
            if number == "*":
                star = True
            elif number:
                _check_width(int(number), "format width", _max_chars())
    values = arguments if isinstance(arguments, tuple) else (arguments,)
    if star:
        for value in values:
            _check_width(value, "format width", _max_chars())
    for value in values:
        _check_str_size(value, "a format argument")


def _check_str_format(format_string: str, args: tuple, kwargs: dict) -> None:
    """``format_string.format(...)``: literal widths within the caps; nested ``{}`` widths come
    from the arguments, so then every integer argument must be within them too."""
    try:
        fields = list(string.Formatter().parse(format_string))
    except ValueError:
        return  # str.format itself reports the malformed string
    nested = False
    for _, _, spec, _ in fields:
        if spec:
            nested = nested or "{" in spec
            for number in re.findall(r"\d+", spec):
                _check_width(int(number), "format width", _max_chars())
    for value in (*args, *kwargs.values()):
        if nested:
            _check_width(value, "format width", _max_chars())
        _check_str_size(value, "a format argument")


def _check_join(separator: str, items: list) -> None:
    limit = _max_chars()
    total = len(separator) * max(len(items) - 1, 0) + _estimated_str_len(items, limit)
    if total > limit:
        raise _too_big("a joined string", total, limit)


def _check_replace(text: str, old: str, new: str, count: int = -1) -> None:
    occurrences = text.count(old) if old else len(text) + 1
    if count is not None and count >= 0:
        occurrences = min(occurrences, count)
    size = len(text) + occurrences * (len(new) - len(old))
    if size > _max_chars():
        raise _too_big("a string", size, _max_chars())


# ---------------------------------------------------------------- the sandbox


class _GuardedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with a deadline check in every ``for`` loop and a size check on
    every operand of ``~``. Both are rewrites of the template's syntax tree before compilation:
    loops iterate over ``environment.guard_iterable(...)`` and ``~`` operands pass through
    ``environment.guard_concat_part(...)``; environment attributes cannot be shadowed by a
    template's variables."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in node.find_all(nodes.For):
            loop.iter = _environment_call("guard_iterable", loop.iter, loop.lineno)
        for concat in node.find_all(nodes.Concat):
            concat.nodes = [
                _environment_call("guard_concat_part", part, concat.lineno) for part in concat.nodes
            ]
        super().visit_Template(node, frame)


def _environment_call(method: str, argument: nodes.Expr, lineno: int) -> nodes.Call:
    return nodes.Call(
        nodes.EnvironmentAttribute(method, lineno=lineno), [argument], [], None, None, lineno=lineno
    )


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}``: marks assistant text for training
    masks; rendering a prompt only needs the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """transformers' namespace: no underscore-prefixed names, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (same trick as jinja's Namespace)
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(
                f"chat templates cannot store underscore-prefixed names on a namespace: {name!r}."
            )


class _TemplateDict:
    """transformers' ``dict`` global: a plain dict factory with no type to reach through."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return _check_result(dict.fromkeys(*args, **kwargs))


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
):
    # transformers' tojson: unlike Jinja's, it does not HTML-escape and keeps non-ASCII text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _check_filter_arguments(name: str, args: tuple, kwargs: dict) -> None:
    """Pre-checks for filters whose output can dwarf their input. ``args[0]`` is the value."""

    def argument(position: int, keyword: str, default: Any = None) -> Any:
        return args[position] if len(args) > position else kwargs.get(keyword, default)

    value = args[0] if args else None
    if name == "center":
        _check_width(argument(1, "width"), "width")
    elif name == "indent":
        _check_width(argument(1, "width"), "indent width")
    elif name == "batch":
        _check_width(argument(1, "linecount"), "batch size")
    elif name == "slice":
        _check_width(argument(1, "slices"), "number of slices")
    elif name == "tojson":
        indent = argument(2, "indent")
        _check_width(len(indent) if isinstance(indent, str) else indent, "JSON indent", MAX_JSON_INDENT)
    elif name == "format" and isinstance(value, str):
        _check_printf(value, kwargs if kwargs else tuple(args[1:]))
    elif name == "replace" and isinstance(value, str):
        old, new = str(argument(1, "old", "")), str(argument(2, "new", ""))
        _check_replace(value, old, new, argument(3, "count", -1))
    elif name == "join" and isinstance(value, (list, tuple)):
        _check_join(str(argument(1, "d", "")), list(value))
    elif name == "sum" and isinstance(argument(2, "start", 0), (str, list, tuple)):
        start = argument(2, "start", 0)
        size = len(start) + sum(len(item) for item in value if isinstance(item, (str, list, tuple)))
        if size > MAX_LIST_ITEMS:
            raise _too_big("a sum", size, MAX_LIST_ITEMS)
    if name in _STRINGIFYING_FILTERS and not isinstance(value, str):
        _check_str_size(value)


# Filters that turn their whole value into one string.
_STRINGIFYING_FILTERS = frozenset(
    "capitalize center e escape forceescape format indent lower pprint replace safe string striptags title tojson "
    "trim truncate upper urlencode urlize wordcount wordwrap".split()
)


def _guard_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    # Filters taking a context, eval context or environment get it as their first argument.
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(function)  # keeps jinja_pass_arg, so Jinja still passes the context
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_time()
        _check_filter_arguments(name, args[skip:], kwargs)
        return _check_result(function(*args, **kwargs))

    return guarded


def _check_call(function: Any, args: tuple, kwargs: dict) -> tuple:
    """Pre-checks for ``str`` methods whose output can dwarf their input. Returns the arguments to
    call with (``join``'s iterable is materialised once, so it is checked and joined as the same list)."""
    target = getattr(function, "__wrapped__", function)  # the sandbox wraps str.format / format_map
    owner = getattr(target, "__self__", None)
    if not isinstance(owner, str):
        return args
    method = getattr(target, "__name__", "")
    if method in ("center", "ljust", "rjust", "zfill"):
        _check_width(args[0] if args else kwargs.get("width"), "width")
    elif method == "expandtabs":
        tab_size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab_size, int):
            _check_width(len(owner) + owner.count("\t") * tab_size, "expanded string", _max_chars())
    elif method == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    elif method == "join" and args:
        items = list(args[0])
        if len(items) > MAX_LIST_ITEMS:
            raise _too_big("a join", len(items), MAX_LIST_ITEMS)
        _check_join(owner, items)
        return (items, *args[1:])
    elif method == "format":
        _check_str_format(owner, args, kwargs)
    elif method == "format_map" and args and isinstance(args[0], Mapping):
        _check_str_format(owner, (), dict(args[0]))
    return args


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox with the budget checks wired into every hook Jinja offers."""

    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
            finalize=self._finalize,
        )
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, function) for name, function in self.filters.items()}
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.globals["dict"] = _TemplateDict()
        self.globals["namespace"] = _Namespace
        # lipsum(n) writes n paragraphs; no chat template uses it.
        self.globals.pop("lipsum", None)

    @staticmethod
    def _finalize(value: Any) -> Any:
        """Every ``{{ expression }}`` passes here before it is turned into text."""
        _check_time()
        if not isinstance(value, str):
            _check_str_size(value)
        return _check_result(value)

    def guard_iterable(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """What every ``for`` loop iterates over: the original iterable, with a deadline check
        before each item."""
        _check_time()
        for item in iterable:
            _check_time()
            yield item

    def guard_concat_part(self, value: Any) -> Any:
        _check_time()
        _check_str_size(value, "a concatenation")
        return value

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_time()
        return super().getitem(obj, argument)

    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check_time()
        args = _check_call(obj, args, kwargs)
        return _check_result(super().call(context, obj, *args, **kwargs))

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        if operator == "+":
            if isinstance(left, str) and isinstance(right, str):
                _check_width(len(left) + len(right), "string length", _max_chars())
            elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
                _check_width(len(left) + len(right), "list length", MAX_LIST_ITEMS)
        elif operator == "*":
            sequence, times = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(sequence, (str, list, tuple)) and isinstance(times, int):
                limit = _max_chars() if isinstance(sequence, str) else MAX_LIST_ITEMS
                _check_width(len(sequence) * times, "repeated length", limit)
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                _check_width(right * abs(left).bit_length(), "power of that many bits", MAX_POWER_BITS)
        elif operator == "%" and isinstance(left, str):
            _check_printf(left, right)
        return _check_result(super().call_binop(context, operator, left, right))


_ENVIRONMENT = _Environment()


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached: a server renders the same few templates for every request).
    Raises ``TemplateSyntaxError`` for invalid Jinja."""
    return _ENVIRONMENT.from_string(source)


def render(source: str, variables: Mapping[str, Any], timeout_s: float, max_output_chars: int) -> str:
    """Render ``source`` with ``variables`` inside the budget. Raises :class:`LimitExceeded` past
    ``timeout_s`` or ``max_output_chars``, :class:`TemplateRaised` for ``raise_exception``, and
    whatever else the template raises (a ``SecurityError``, a ``TypeError``, ...)."""
    token = _LIMITS.set(_Limits(time.monotonic() + timeout_s, timeout_s, max_output_chars))
    try:
        chunks: list[str] = []
        size = 0
        for chunk in compile_template(source).generate(**variables):
            size += len(chunk)
            if size > max_output_chars:
                raise LimitExceeded(f"the chat template wrote more than {max_output_chars} characters.")
            _check_time()
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        _LIMITS.reset(token)
