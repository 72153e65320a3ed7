"""The one number formatter and the escaping helpers every rendering of the report uses."""

from __future__ import annotations

import html
from typing import Any


def number(value: Any, digits: int = 4, *, none: str = "—") -> str:
    """A value for people: floats to ``digits`` significant digits, booleans as yes/no, None as ``none``.

    The result is plain text; escape it for the medium (:func:`esc`, :func:`md`).
    """
    if value is None:
        return none
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def esc(value: Any) -> str:
    """HTML-escape any value (quotes too): the one way text enters the HTML page."""
    return html.escape(str(value), quote=True)


def md(value: Any) -> str:
    """Escape a value for Markdown text and table cells (HTML entities, pipes, newlines, backticks)."""
    text = html.escape(str(value), quote=True)
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ").replace("`", "&#96;")
