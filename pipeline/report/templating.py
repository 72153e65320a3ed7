"""The Jinja2 environments that render the report's HTML page and its Markdown model cards.

Both have autoescape on, so a value reaches the output only through its medium's escaper: the page's
``{{ value }}`` goes through :func:`pipeline.report.fmt.esc` (``html.escape``, quotes too), a card's through
:func:`pipeline.report.fmt.md` (HTML entities, table pipes, line breaks, backticks). Markup a template builds
(macros, ``|safe`` on strings a template or this package wrote) passes unchanged. The templates live beside
this module (``templates/*.j2``, package data).

HTML templates are written one element per line for people; :class:`JoinLines` removes every line break
of the template's own markup (and the indentation after it) when the template is compiled, so the page is
the same compact HTML whatever the template's layout. It touches template text only, never a value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from jinja2.ext import Extension
from jinja2.lexer import Token, TokenStream
from markupsafe import Markup

from pipeline.report.fmt import esc, md, number

TEMPLATES = Path(__file__).with_name("templates")
_LINE_BREAK = re.compile(r"\n[ \t]*")


class JoinLines(Extension):
    """Drop each line break of a template's text (with the indentation after it) at compile time.

    Only ``data`` tokens (the template's literal text) change; expressions, and the values they yield,
    are untouched. A space that must survive a line break is written on the line before it.
    """

    def filter_stream(self, stream: TokenStream) -> Iterator[Token]:
        for token in stream:
            if token.type == "data":
                value = _LINE_BREAK.sub("", token.value)
                if value:
                    yield Token(token.lineno, "data", value)
            else:
                yield token


def _escaped_by(escape):
    """An autoescape ``finalize``: escape a value with the medium's own escaper unless it already is markup."""

    def finalize(value: Any) -> Any:
        return value if hasattr(value, "__html__") else Markup(escape(value))

    return finalize


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _is_real(value: Any) -> bool:
    """JSON numbers as the renderers always treated them (bool included: it is an int)."""
    return isinstance(value, (int, float))


def _is_pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2


def _common(env: Environment) -> Environment:
    env.filters["num"] = number
    env.tests.update({"list": _is_list, "records": _is_records, "real": _is_real, "pair": _is_pair})
    return env


@lru_cache(maxsize=1)
def html_environment() -> Environment:
    """The page's environment: HTML autoescape by :func:`esc`, template line breaks removed."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        finalize=_escaped_by(esc),
        undefined=StrictUndefined,
        extensions=[JoinLines],
    )
    return _common(env)


@lru_cache(maxsize=1)
def markdown_environment() -> Environment:
    """The model cards' environment: Markdown autoescape by :func:`md`; one template line, one card line."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        finalize=_escaped_by(md),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    _common(env).filters["num"] = lambda value, digits=4: number(value, digits, none="n/a")  # a card's None: n/a
    return env
