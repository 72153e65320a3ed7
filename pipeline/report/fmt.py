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


def sig3(value: Any) -> str:
    """A number for prose: 3 significant digits (full precision stays in report.json)."""
    return number(value, 3)


METRIC_NAMES = {"r2": "R²", "mae": "MAE", "rmse": "RMSE", "macro_f1": "macro-F1"}  # keys as people write them


def metric_name(key: str) -> str:
    """A metric key as people write it (r2 -> R², mae -> MAE); other keys (accuracy, recall) as they are."""
    return METRIC_NAMES.get(key, key)


def esc(value: Any) -> str:
    """HTML-escape any value (quotes too): the one way text enters the HTML page."""
    return html.escape(str(value), quote=True)


def md(value: Any) -> str:
    """Escape a value for Markdown text and table cells (HTML entities, pipes, newlines, backticks)."""
    text = html.escape(str(value), quote=True)
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ").replace("`", "&#96;")
