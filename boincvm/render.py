"""Every file boincvm generates comes from a jinja2 template in ``templates/``.

The environment uses ``StrictUndefined`` (a missing value is an error, not an empty
string) and autoescapes XML templates; the ``xml`` filter escapes text exactly as
BOINC's parser undoes it. Expressions a user supplies (batch rows) are rendered in a
sandbox.
"""

from __future__ import annotations

import contextlib
import functools
import re
import shlex
import signal
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.nodes
import jinja2.sandbox
from markupsafe import Markup

from boincvm.errors import InputError
from boincvm.xmlio import escape_text


def templates_dir() -> Path:
    """Where the templates are: inside the installed wheel, or the source tree's ``templates/``."""
    packaged = Path(str(resources.files("boincvm"))) / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "templates"


def _xml(value: object) -> Markup:
    return Markup(escape_text(value))  # noqa: S704 - escape_text has escaped it


def _shquote(value: object) -> str:
    return shlex.quote(str(value))


def _num(value: float | int) -> str:
    """A number the way BOINC writes it: integers without a fraction, others in %g style."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


@functools.cache
def environment() -> jinja2.Environment:
    """The shared environment for boincvm's own templates."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(["xml", "xml.j2"]),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["xml"] = _xml
    env.filters["shquote"] = _shquote
    env.filters["num"] = _num
    return env


def render(template: str, /, **context: Any) -> str:
    """Render one of boincvm's templates."""
    return environment().get_template(template).render(**context)


#: The longest text (or list) one user expression may build, and the largest power it may take.
MAX_USER_VALUE = 1_000_000
_MAX_EXPONENT = 1000


class _UserSandbox(jinja2.sandbox.SandboxedEnvironment):
    """jinja2's sandbox, with ``*`` and ``**`` bounded so one expression cannot eat the memory."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > _MAX_EXPONENT:
            raise jinja2.exceptions.SecurityError(f"the power {right} is above {_MAX_EXPONENT}")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (
                    isinstance(seq, (str, list, tuple))
                    and isinstance(n, int)
                    and len(seq) * n > MAX_USER_VALUE
                ):
                    raise jinja2.exceptions.SecurityError(f"the result would be longer than {MAX_USER_VALUE}")
        return super().call_binop(context, operator, left, right)


@functools.cache
def _sandbox() -> jinja2.sandbox.SandboxedEnvironment:
    return _UserSandbox(undefined=jinja2.StrictUndefined, autoescape=False)


#: Tags that read other templates, i.e. files: a user expression may name none.
_FILE_TAGS = (jinja2.nodes.Include, jinja2.nodes.Import, jinja2.nodes.FromImport, jinja2.nodes.Extends)
_TEMPLATE_HINT = (
    "use {{ column }} placeholders, filters and {% if %}/{% for %}; no include, import or extends"
)


class _Substitution:
    """A template made only of text and plain ``{{ name }}`` placeholders, rendered without jinja.

    Batches render three templates per workunit; for the common case of plain column
    substitution this is some ten times faster and gives the same text.
    """

    _FIELD = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")

    def __init__(self, source: str) -> None:
        self.parts = self._FIELD.split(source)

    @classmethod
    def fits(cls, source: str) -> bool:
        rest = cls._FIELD.sub("", source)
        return not any(tok in rest for tok in ("{{", "}}", "{%", "%}", "{#", "#}"))

    def render(self, row: dict[str, Any]) -> str:
        out = []
        for i, part in enumerate(self.parts):
            if i % 2 == 0:
                out.append(part)
            elif part in row:
                out.append(str(row[part]))
            else:
                raise jinja2.UndefinedError(f"'{part}' is undefined")
        return "".join(out)


UserTemplate = jinja2.Template | _Substitution


def compile_user_template(source: str, *, place: str) -> UserTemplate:
    """Compile a user-supplied expression (a batch command line or file name) in a sandbox.

    Raises:
        InputError: the expression is not valid jinja2.
    """
    if _Substitution.fits(source):
        return _Substitution(source)
    env = _sandbox()
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(
            f"{place}: {source!r} is not a valid template: {exc.message}", hint=_TEMPLATE_HINT
        ) from None
    if any(True for _ in tree.find_all(_FILE_TAGS)):
        raise InputError(
            f"{place}: the template includes, imports or extends another template, which boincvm refuses",
            hint=_TEMPLATE_HINT,
        )
    return env.from_string(tree)


#: How long one user template may take on one row (seconds of wall time).
MAX_USER_SECONDS = 2.0


class _TooSlow(Exception):
    """A user template ran past :data:`MAX_USER_SECONDS`."""


def _expired(signum: int, frame: object) -> None:  # noqa: ARG001 - the signal API
    raise _TooSlow


#: Whether :func:`user_templates_bounded` has installed :func:`_expired` for SIGALRM.
_installed = [False]


@contextlib.contextmanager
def user_templates_bounded() -> Iterator[None]:
    """Install the handler of the time bound once for many renders (a batch's rows): each
    render then only arms and disarms the timer. Only the main thread receives signals;
    elsewhere renders are bounded in size and recursion, not in time."""
    if _installed[0] or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _expired)
    _installed[0] = True
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _installed[0] = False


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block with :class:`_TooSlow` after ``seconds`` (a real-time timer)."""
    with user_templates_bounded():
        if not _installed[0]:  # not the main thread
            yield
            return
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


def _bounded_render(template: jinja2.Template, row: dict[str, Any]) -> str:
    """Render with the output's size, the time and the recursion depth bounded."""
    out: list[str] = []
    size = 0
    with _deadline(MAX_USER_SECONDS):
        for chunk in template.generate(row):
            size += len(chunk)
            if size > MAX_USER_VALUE:
                raise jinja2.exceptions.SecurityError(f"the result would be longer than {MAX_USER_VALUE}")
            out.append(chunk)
    return "".join(out)


def render_user_template(template: UserTemplate, row: dict[str, Any], *, place: str) -> str:
    """Render a user template with one batch row.

    A template is bounded: its output (:data:`MAX_USER_VALUE` characters), its time on one row
    (:data:`MAX_USER_SECONDS`) and its recursion (a macro calling itself without end).

    Raises:
        InputError: it names a column the row lacks, is unsafe, or exceeds a bound.
    """
    try:
        if isinstance(template, _Substitution):
            return template.render(row)
        return _bounded_render(template, row)
    except jinja2.UndefinedError as exc:
        raise InputError(f"{place}: {exc.message}", hint="check the column names in the batch file") from None
    except jinja2.exceptions.SecurityError as exc:
        raise InputError(f"{place}: refused by the sandbox: {exc}", hint=_TEMPLATE_HINT) from None
    except RecursionError:
        raise InputError(
            f"{place}: the template calls itself without end (a macro that recurses)",
            hint="give the macro a condition that stops it, or use a {% for %} loop",
        ) from None
    except _TooSlow:
        raise InputError(
            f"{place}: the template ran longer than {MAX_USER_SECONDS:g} s on one row",
            hint="simplify the expression: a batch template should only combine the row's values",
        ) from None
    except (jinja2.TemplateError, ArithmeticError, TypeError, ValueError, LookupError) as exc:
        # A user expression that fails on a row's values ({{ x / 0 }}, {{ x + 1 }} on text).
        raise InputError(
            f"{place}: the template failed on this row ({type(exc).__name__}: {exc})",
            hint="check the expression against the row's values",
        ) from None
