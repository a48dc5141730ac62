"""The Jinja sandbox that chat templates run in, with limits on time and size.

Rendering follows Hugging Face transformers (templates are written for it): an
``ImmutableSandboxedEnvironment`` with trim_blocks, lstrip_blocks and loop controls, ``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII text, and the ``{% generation %}`` tag. On top of
jinja2's sandbox, a template can never run away:

- the compiled template checks the clock at every loop iteration, call, attribute access and output
  piece (``Limits.timeout_s``);
- every value it builds (strings, lists, dicts, operator, filter and call results) is measured before it
  can be printed, compared or copied: none may exceed ``max_chars``, and all together may not exceed
  ``alloc_chars``; arguments that would make one C-level call explode (``'x' * n``, ``center(n)``,
  ``replace``, ``join``, ``'%0999999d'``, ``'{:>999999}'.format``) are checked before the call;
- reading an attribute the sandbox forbids (``__class__``, ``__globals__`` ...), directly, through
  ``|attr`` or through ``str.format`` fields, fails at once instead of rendering as empty;
- ``include``/``import``/``extends`` find no loader; ``lipsum``, ``cycler`` and ``joiner`` are gone.

Every failure is a :class:`ChatTemplateError` with one line that says what happened.
"""
from __future__ import annotations

import contextvars
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace
from markupsafe import Markup

from .errors import ChatTemplateError


@dataclass(frozen=True)
class Limits:
    max_chars: int = 2_000_000      # largest output and largest single value (a 128K-token prompt is ~0.5M)
    alloc_chars: int = 128_000_000  # all values built during one rendering, together
    timeout_s: float = 10.0         # wall time of one rendering
    max_source: int = 1_000_000     # template size


LIMITS = Limits()

# ---- limits, per rendering ----------------------------------------------------------------------
class _Budget:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout_s
        self.alloc = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"the chat template ran longer than {self.limits.timeout_s:g} s and was stopped")

    def check(self, value: Any) -> int:
        """Size of an existing value; too big to print, compare or copy -> error."""
        n = _size(value, self.limits.max_chars)
        if n > self.limits.max_chars:
            raise ChatTemplateError(f"the chat template built a value of more than {self.limits.max_chars} "
                                    "characters and was stopped")
        return n

    def charge(self, value: Any) -> Any:
        """A value just built: checked, and counted against the total."""
        self.alloc += self.check(value)
        if self.alloc > self.limits.alloc_chars:
            raise ChatTemplateError(f"the chat template built more than {self.limits.alloc_chars} characters "
                                    "in all and was stopped")
        self.tick()
        return value

    def check_int(self, n: Any, what: str) -> None:
        if isinstance(n, int) and abs(n) > self.limits.max_chars:
            raise ChatTemplateError(f"the chat template asked for {what} of {n}; the limit is {self.limits.max_chars}")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("ggtorch_chat_budget", default=None)


def _budget() -> _Budget:
    b = _BUDGET.get()
    return b if b is not None else _Budget(LIMITS)  # outside render(): the default limits, a fresh clock


def _size(v: Any, limit: int) -> int:
    """Length of ``v`` as text, counting shared references as often as they occur; stops past ``limit``."""
    total, stack = 0, [v]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            total += len(x)
        elif isinstance(x, (list, tuple, set, frozenset)):
            total += 2 + len(x)
            stack.extend(x)
        elif isinstance(x, dict):
            total += 2 + 2 * len(x)
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, Namespace):
            d = object.__getattribute__(x, "_Namespace__attrs")
            total += 2 + len(d)
            stack.extend(d.values())
        elif isinstance(x, int) and not isinstance(x, bool):
            total += x.bit_length() // 3 + 1
        else:
            total += 8
        if total > limit:
            break
    return total


# ---- the sandbox ------------------------------------------------------------------------------------
_PCT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent(fmt: str, args: Any) -> None:
    b = _budget()
    for m in _PCT_SPEC.finditer(fmt):
        for g in m.groups():
            if g == "*":
                raise ChatTemplateError("the chat template used a '*' width in a %-format, which is not allowed")
            if g:
                b.check_int(int(g), "a %-format width")
    b.check(args)


class _Formatter(SandboxedFormatter):
    """str.format with the sandbox's field lookup, and widths/precisions within the limit."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        b = _budget()
        for n in re.findall(r"\d+", format_spec):
            b.check_int(int(n), "a format width")
        b.check(value)
        return b.charge(super().format_field(value, format_spec))


class _Guard(CodeGenerator):
    """Compiles templates so that loops, concatenations and literals report to the budget."""

    def visit_Template(self, node: nodes.Template, frame=None) -> None:
        # every loop iterates through _loop, which checks the clock (before the filter table is built)
        for f in node.find_all(nodes.For):
            f.iter = nodes.Filter(f.iter, "_ggtorch_loop", [], [], None, None, lineno=f.lineno)
        super().visit_Template(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.ggtorch_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _charged(self, visit, node, frame) -> None:
        self.write("environment.ggtorch_charge(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node, frame) -> None:
        self._charged(super().visit_List, node, frame)

    def visit_Dict(self, node, frame) -> None:
        self._charged(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame) -> None:
        if node.ctx == "load":
            self._charged(super().visit_Tuple, node, frame)
        else:
            super().visit_Tuple(node, frame)


class _Generation(Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (marks assistant text): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _TemplateNamespace(Namespace):
    """``namespace()`` that refuses underscore names, as transformers' does."""

    def __init__(*args, **kwargs):  # noqa: N805 - Namespace's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for k in attrs:
            _TemplateNamespace._check(k)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise ChatTemplateError(f"the chat template stored the underscore name {name!r} in a namespace, "
                                    "which the sandbox forbids")


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` without exposing the ``dict`` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _now() -> datetime:
    return datetime.now()


def _strftime_now(fmt):
    return _now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    b = _budget()
    b.check_int(indent, "a tojson indent")
    if isinstance(indent, str) or separators is not None:  # string indents multiply with the nesting
        b.check_int(_size(x, b.limits.max_chars) * (1 + len(str(indent or "")) + _size(separators, 64)), "a tojson size")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _loop(it):
    b = _budget()
    for i, x in enumerate(it):
        if not i & 63:
            b.tick()
        yield x


def _estimate(name: str, obj: Any, args: tuple, kwargs: dict) -> int | None:
    """Size of the result of string method/filter ``name`` before running it (None: nothing to check)."""
    def arg(i, key, default=None):
        return args[i] if len(args) > i else kwargs.get(key, default)

    if not isinstance(obj, str) and name not in ("join",):
        return None
    if name == "replace":
        old, new, count = str(arg(0, "old", "")), str(arg(1, "new", "")), arg(2, "count", -1)
        n = obj.count(old) if old else len(obj) + 1
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        return len(obj) + n * max(0, len(new) - len(old))
    if name == "join":  # only lists (a generator's items are measured as they are made)
        items = obj if not isinstance(obj, str) else arg(0, "iterable", [])
        if not isinstance(items, (list, tuple)):
            return None
        sep = arg(0, "d", "") if not isinstance(obj, str) else obj
        return sum(_size(x, 1 << 62) for x in items) + len(str(sep)) * max(0, len(items) - 1)
    if name in ("center", "ljust", "rjust", "zfill"):
        w = arg(0, "width", 80)
        return w if isinstance(w, int) else None
    if name == "expandtabs":
        w = arg(0, "tabsize", 8)
        return len(obj) + obj.count("\t") * w if isinstance(w, int) else None
    if name == "indent":
        w = arg(0, "width", 4)
        w = len(w) if isinstance(w, str) else w if isinstance(w, int) else 0
        return len(obj) + (obj.count("\n") + 1) * w
    if name == "wordwrap":
        width, wrap = arg(0, "width", 79), arg(2, "wrapstring", "\n")
        if isinstance(width, int) and wrap is not None:
            return len(obj) + (len(obj) // max(1, width) + 1) * len(str(wrap))
    return None


class _Env(ImmutableSandboxedEnvironment):
    code_generator_class = _Guard
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation],
                         finalize=self._finalize)
        for k in ("lipsum", "cycler", "joiner"):  # objects that could hold values the budget does not see
            self.globals.pop(k, None)
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                            namespace=_TemplateNamespace, dict=_TemplateDict())
        self.filters["tojson"] = _tojson
        self.filters = {name: self._guard_filter(name, f) for name, f in self.filters.items()}
        self.filters["_ggtorch_loop"] = _loop

    # every value a template builds or prints is measured
    @staticmethod
    def ggtorch_charge(value):
        return _budget().charge(value)

    @staticmethod
    def ggtorch_concat(parts):
        b = _budget()
        for p in parts:
            b.check(p)
        return b.charge("".join(map(str, parts)))

    @staticmethod
    def _finalize(value):
        _budget().check(value)
        return value

    @staticmethod
    def _guard_filter(name, f):
        def guarded(*args, **kwargs):
            b = _budget()
            # the value may follow an environment/context/eval-context argument
            for a in args:
                if isinstance(a, (str, list, tuple, dict, int)):
                    b.check(a) if not isinstance(a, int) else b.check_int(a, f"an argument of |{name}")
            for a in kwargs.values():
                b.check(a) if not isinstance(a, int) else b.check_int(a, f"an argument of |{name}")
            vals = [a for a in args if not isinstance(a, (jinja2.Environment, jinja2.runtime.Context,
                                                             nodes.EvalContext))]
            if vals:
                est = _estimate(name, vals[0], tuple(vals[1:]), kwargs)
                if est is not None:
                    b.check_int(est, f"a result of |{name}")
            if name == "format" and vals and isinstance(vals[0], str):
                _check_percent(vals[0], vals[1:])
            return b.charge(f(*args, **kwargs))

        for attr in ("jinja_pass_arg",):  # keep pass_context / pass_eval_context / pass_environment
            if hasattr(f, attr):
                setattr(guarded, attr, getattr(f, attr))
        return guarded

    def is_safe_attribute(self, obj, attr, value):
        if isinstance(obj, type) or attr in ("mro",):
            return False
        return super().is_safe_attribute(obj, attr, value)

    def unsafe_undefined(self, obj, attribute):
        raise ChatTemplateError(f"the chat template read the attribute {attribute!r} of a {type(obj).__name__!r} "
                                "object, which the sandbox forbids")

    def wrap_str_format(self, value):
        fmt = super().wrap_str_format(value)
        if fmt is None or not isinstance(value.__self__, str) or isinstance(value.__self__, Markup):
            return fmt
        s, is_map, formatter = value.__self__, value.__name__ == "format_map", _Formatter(self)

        def wrapper(*args, **kwargs):
            if is_map:
                if kwargs or len(args) != 1:
                    raise ChatTemplateError("format_map() takes exactly one argument")
                args, kwargs = (), args[0]
            return _budget().charge(str(formatter.vformat(s, args, kwargs)))

        return wrapper

    def getattr(self, obj, attribute):
        _budget().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _budget().tick()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        b = _budget()
        seq = (str, list, tuple)
        if operator == "*":
            if isinstance(left, seq) and isinstance(right, int) or isinstance(right, seq) and isinstance(left, int):
                s, n = (left, right) if isinstance(left, seq) else (right, left)
                b.check_int(_size(s, b.limits.max_chars) * max(n, 0), "a repetition")
            elif isinstance(left, int) and isinstance(right, int):
                b.check_int(left.bit_length() + right.bit_length(), "an integer product's bits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            b.check_int(max(right, 0) * left.bit_length(), "an integer power's bits")
        elif operator == "%" and isinstance(left, str):
            _check_percent(left, right)
        return b.charge(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        b = _budget()
        b.tick()
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, int):
                continue
            b.check(a)
        name, owner = getattr(__obj, "__name__", ""), getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            for a in list(args) + list(kwargs.values()):
                if name in ("center", "ljust", "rjust", "zfill", "expandtabs"):
                    b.check_int(a, f"an argument of str.{name}")
            est = _estimate(name, owner, args, kwargs)
            if est is not None:
                b.check_int(est, f"a result of str.{name}")
        return b.charge(super().call(__context, __obj, *args, **kwargs))


_ENV = _Env()


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}): {e.message}") from None


# ---- rendering ------------------------------------------------------------------------------------
def render(source: str, variables: dict, limits: Limits = LIMITS) -> str:
    """Render template ``source`` with ``variables`` inside the sandbox and ``limits``."""
    if not isinstance(source, str):
        raise ChatTemplateError(f"a chat template must be a string, got {type(source).__name__}")
    if len(source) > limits.max_source:
        raise ChatTemplateError(f"the chat template has {len(source)} characters; the limit is {limits.max_source}")
    token = _BUDGET.set(_Budget(limits))
    try:
        tmpl = _compile(source)
        b, out, n = _budget(), [], 0
        for piece in tmpl.generate(**variables):
            n += len(piece)
            if n > limits.max_chars:
                raise ChatTemplateError(f"the chat template's output passed {limits.max_chars} characters and was "
                                        "stopped")
            b.tick()
            out.append(piece)
        return "".join(out)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template did something the sandbox forbids: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from None
    except RecursionError:
        raise ChatTemplateError("the chat template recursed too deeply") from None
    except MemoryError:
        raise ChatTemplateError("the chat template ran out of memory") from None
    except Exception as e:  # a template's own TypeError/ValueError/KeyError... on these messages
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
    finally:
        _BUDGET.reset(token)
