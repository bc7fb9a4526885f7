"""Chat templates: read from a checkpoint, checked when loaded, rendered in a bounded sandbox.

A checkpoint's template is code from its publisher run on the user's machine. It is rendered in jinja2's immutable
sandbox with transformers' settings (trim_blocks, lstrip_blocks, loop controls), and bounded on top of it: a
wall-clock deadline checked on every loop step, call and intercepted operator, caps on what one operation may build
(``*``, ``+``, ``%``, ``**``, ``~``, width arguments of filters and string methods) and on the output's length. A
broken or hostile template ends in a ``ValueError`` naming its file and line instead of a traceback of jinja2's own
exception types, a hang or the machine running out of memory.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
import time
import traceback
from pathlib import Path
from typing import Any

RENDER_TIMEOUT_S = 5.0  # far above any real template (milliseconds), far below a user giving up
MAX_LENGTH = 1 << 24  # characters (or items) one value built by a template, or its output beyond the inputs, may hold
MAX_SIZE_ARG = 1 << 16  # largest width, indent or count a filter or string method may be asked for
MAX_INT_BITS = 1 << 14  # integers a template computes stay below 2**16384 (big-int arithmetic is not free)
_SIZE_ARG_CALLS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap", "truncate",
                             "batch", "slice", "tojson", "format", "format_map", "replace"})
_FORMAT_WIDTH = re.compile(r"\d{6,}")  # a width or precision of a million or more in a format string
_NESTED_WIDTH = re.compile(r"\{[^{}]*:[^{}]*\{")  # str.format's "{:{w}}": a width taken from an argument


class ChatTemplate(str):
    """A template's source text that remembers where it came from, for error messages, and its compiled code once
    rendered (compiling the Gemma-3 template costs ~5 ms, paid on every chat request otherwise)."""

    origin: str
    code: Any = None

    def __new__(cls, text: str, origin: str = "chat template") -> ChatTemplate:
        obj = super().__new__(cls, text)
        obj.origin = origin
        return obj


def origin_of(template: str) -> str:
    return getattr(template, "origin", "chat template")


class _Refused(ValueError):
    """A template that went over one of the bounds (time, size); raised from inside the sandbox."""


@functools.cache
def _environment():
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%", "//"})

        def __init__(self, timeout_s: float):
            super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
            self.timeout_s, self.deadline = timeout_s, time.monotonic() + timeout_s
            self.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
            self.filters = {k: _guarded(self, k, f) for k, f in self.filters.items()}
            del self.globals["lipsum"]  # builds text of any size asked for; no chat template uses it

        def tick(self) -> None:
            if time.monotonic() > self.deadline:
                raise _Refused(f"rendering took longer than {self.timeout_s:g} s (a loop or recursion without bound?)")

        def call_binop(self, context, operator, left, right):
            self.tick()
            _check_binop(operator, left, right)
            return _checked(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            __self.tick()
            _check_call(__obj, args, kwargs)
            return _checked(super().call(__context, __obj, *args, **kwargs))

        def bounded_iter(self, iterable):
            return _Ticking(self, iterable)

        def bounded_concat(self, *parts):
            parts = [str(p) for p in parts]
            if sum(map(len, parts)) > MAX_LENGTH:
                raise _Refused(f"a string joined with '~' exceeds {MAX_LENGTH} characters")
            return "".join(parts)

    return BoundedSandbox


class _Ticking:
    """An iterable that checks the deadline as a for loop walks it (a loop body that calls nothing would not)."""

    def __init__(self, env, iterable):
        self.env, self.iterable = env, iterable

    def __iter__(self):
        for i, x in enumerate(self.iterable):
            if not i & 63:
                self.env.tick()
            yield x

    def __len__(self) -> int:  # loop.length without materializing; TypeError (as len's) when there is none
        return len(self.iterable)


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict)) else 0


def _checked(value: Any) -> Any:
    if _size(value) > MAX_LENGTH:
        raise _Refused(f"a value of {_size(value)} characters or items exceeds {MAX_LENGTH}")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Refused(f"an integer of {value.bit_length()} bits exceeds {MAX_INT_BITS}")
    return value


def _check_binop(op: str, left: Any, right: Any) -> None:
    """Refuse, before computing it, a result too large to build."""
    ints = isinstance(left, int) and isinstance(right, int)
    if op == "*" and ints and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
        raise _Refused(f"an integer product of {left.bit_length() + right.bit_length()} bits exceeds {MAX_INT_BITS}")
    if op == "*" and not ints:
        n, seq = (right, left) if isinstance(right, int) else (left, right)
        if isinstance(n, int) and _size(seq) * max(n, 0) > MAX_LENGTH:
            raise _Refused(f"{type(seq).__name__} of length {_size(seq)} times {n} exceeds {MAX_LENGTH}")
    if op == "**" and ints and right > 0 and abs(left) > 1 and right * left.bit_length() > MAX_INT_BITS + right:
        raise _Refused(f"{left} ** {right} exceeds {MAX_INT_BITS} bits")
    if op == "+" and _size(left) + _size(right) > MAX_LENGTH:
        raise _Refused(f"a sum of {_size(left) + _size(right)} characters or items exceeds {MAX_LENGTH}")
    if op == "%" and isinstance(left, str):
        _check_format(left, right if isinstance(right, tuple) else (right,), "*" in left)


def _check_format(fmt: str, args: Any, computed_width: bool) -> None:
    """Format strings build what their widths ask for: refuse huge literal widths, and huge arguments where a width
    comes from an argument (``%*d``, ``{:{w}}``)."""
    if any(int(m) > MAX_SIZE_ARG for m in _FORMAT_WIDTH.findall(fmt)):
        raise _Refused(f"format string {fmt[:60]!r} asks for a width above {MAX_SIZE_ARG}")
    if computed_width and any(isinstance(a, int) and abs(a) > MAX_SIZE_ARG for a in args):
        raise _Refused(f"format string {fmt[:60]!r} with a width argument above {MAX_SIZE_ARG}")


def _check_call(func: Any, args: tuple, kwargs: dict) -> None:
    """Refuse size arguments (widths, counts) that would build a huge value in one C call."""
    name = getattr(func, "__name__", "")
    if name not in _SIZE_ARG_CALLS:
        return
    target = getattr(getattr(func, "__wrapped__", func), "__self__", None)
    if name in ("format", "format_map") and isinstance(target, str):
        _check_format(target, (*args, *kwargs.values()), _NESTED_WIDTH.search(target) is not None)
        return
    if name == "replace" and isinstance(target, str) and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        count = target.count(args[0]) if args[0] else len(target) + 1
        if len(target) + count * (len(args[1]) - len(args[0])) > MAX_LENGTH:
            raise _Refused(f"replace would build more than {MAX_LENGTH} characters")
        return
    _check_sizes(name, (*args, *kwargs.values()))


def _check_sizes(name: str, args: Any) -> None:
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_SIZE_ARG:
            raise _Refused(f"{name}() with a size argument of {a} (above {MAX_SIZE_ARG})")


def _guarded(env, name: str, func):
    """A filter with the same size checks and deadline as a call (filters are called directly, not via ``call``)."""

    @functools.wraps(func)  # keeps jinja2's pass_context / pass_eval_context marks
    def guarded(*args, **kwargs):
        env.tick()
        values = [a for a in args if not _is_jinja_context(a)]
        if name == "replace" and len(values) >= 3 and all(isinstance(v, str) for v in values[:3]):
            _check_call(values[0].replace, tuple(values[1:3]), {})
        elif name == "format" and values and isinstance(values[0], str):
            _check_format(values[0], (*values[1:], *kwargs.values()), "*" in values[0])
        elif name in _SIZE_ARG_CALLS:
            _check_sizes(name, (*values[1:], *kwargs.values()))
        return _checked(func(*args, **kwargs))

    return guarded


def _is_jinja_context(value: Any) -> bool:
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    return isinstance(value, (Context, EvalContext)) or type(value).__name__.endswith("Environment")


def _bound(ast):
    """Route every for loop's iterable and every ``~`` through the environment's checked versions."""
    from jinja2 import nodes

    for node in ast.find_all(nodes.For):
        node.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [], None, None,
                               lineno=node.iter.lineno)
    for node in list(ast.find_all(nodes.Concat)):
        node.nodes = [nodes.Call(nodes.EnvironmentAttribute("bounded_concat"), node.nodes, [], None, None,
                                 lineno=node.lineno)]
    return ast


def compile_template(source: str, timeout_s: float | None = None):
    """(environment, template) for ``source``; a syntax error is a ValueError naming the template's origin and line."""
    from jinja2 import TemplateSyntaxError

    env = _environment()(RENDER_TIMEOUT_S if timeout_s is None else timeout_s)
    try:
        code = getattr(source, "code", None)
        if code is None:  # the code runs against whichever environment it is given: kept across renders
            code = env.compile(_bound(env.parse(source)))
            if isinstance(source, ChatTemplate):
                source.code = code
        return env, env.template_class.from_code(env, code, env.make_globals(None))
    except TemplateSyntaxError as e:
        raise ValueError(f"{origin_of(source)}, line {e.lineno}: chat template syntax error: {e.message}") from None
    except RecursionError:
        raise ValueError(f"{origin_of(source)}: the chat template is nested too deeply to compile") from None


def check_syntax(source: str) -> None:
    compile_template(source)


def render(source: str, variables: dict[str, Any], input_length: int = 0) -> str:
    """Render ``source`` within the deadline and an output of at most ``MAX_LENGTH + 4 * input_length`` characters.

    Every failure is a ValueError naming the template's origin (and the line, where jinja2 knows it);
    ``raise_exception(message)`` in the template raises ``ValueError("chat template <origin>: message")``."""
    where = origin_of(source)
    where = "chat template" if where == "chat template" else f"chat template ({where})"

    def raise_exception(message):
        raise _Refused(f"{where}: {message}")

    env, template = compile_template(source)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(str(fmt))  # as transformers defines it
    env.deadline = time.monotonic() + env.timeout_s  # the clock starts with rendering, compiling included
    limit, out, n = MAX_LENGTH + 4 * input_length, [], 0
    try:
        for chunk in template.generate(**variables):
            out.append(chunk)
            n += len(chunk)
            if n > limit:
                raise _Refused(f"rendering produced more than {limit} characters")
            env.tick()
    except _Refused as e:
        message = str(e)
        if message.startswith(where):  # raise_exception's: the template's own words
            raise ValueError(message) from None
        raise ValueError(f"{where}{_line(e)}: {message}") from None
    except (RecursionError, MemoryError) as e:
        raise ValueError(f"{where}{_line(e)}: rendering failed with {type(e).__name__} (a recursion or value without "
                         f"bound?)") from None
    except Exception as e:  # jinja2's UndefinedError, SecurityError, TemplateError, and Python's own in the template
        raise ValueError(f"{where}{_line(e)}: rendering failed: {type(e).__name__}: {e}") from None
    return "".join(out)


def _line(e: BaseException) -> str:
    """", line N" of the template where ``e`` was raised (jinja2 maps its frames back to template lines)."""
    lines = [n for f, n in traceback.walk_tb(e.__traceback__) if f.f_code.co_filename == "<template>"]
    return f", line {lines[-1]}" if lines else ""


def read_template_file(file: Path) -> ChatTemplate:
    try:
        return ChatTemplate(file.read_bytes().decode("utf-8"), str(file))
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ValueError(f"cannot read {file}: {e.strerror or e}") from None
