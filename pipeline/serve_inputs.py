"""Request bodies of ``python -m pipeline serve`` -> raw input arrays, or a 4xx with a one-line reason.

Everything a client sends is untrusted: the body's size, encoding, JSON nesting, types and
shapes are checked here before a model sees them, and every refusal names the field, row or
column and says how to fix it. The table and image checks themselves are :mod:`pipeline.predict`'s
(:func:`~pipeline.predict_inputs.check_columns`, :func:`~pipeline.predict_inputs.table_values`,
:func:`~pipeline.predict_inputs.check_images`), so ``serve`` accepts exactly what ``predict`` accepts.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import operator
from typing import Any, AsyncIterator

import numpy as np
from starlette.requests import ClientDisconnect

from auditml_core.errors import DataError
from pipeline import predict_inputs
from pipeline.predict_model import ServedModel

JSON = "application/json"
CSV = "text/csv"
MAX_NAME_CHARS = 200  # longest column name echoed back in a message


class BadInput(Exception):
    """A request the server refuses: HTTP ``status`` (4xx) and a one-line ``message`` saying how to fix it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())  # one line, whatever a value or name held


class _NonFinite:
    """A JSON ``NaN`` / ``Infinity`` literal (Python's json accepts them; strict JSON does not)."""

    def __init__(self, literal: str):
        self.literal = literal


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def media_type(content_type: str | None, *, accepted: tuple[str, ...]) -> str:
    """The request's media type if it is one of ``accepted`` (UTF-8 only), else a 415.

    Raises
    ------
    BadInput
        415 for a missing or other content type, or a charset other than UTF-8.
    """
    want = " or ".join(accepted)
    if not content_type:
        raise BadInput(415, f"the request has no Content-Type; send it as {want}")
    kind, *params = (p.strip() for p in content_type.split(";"))
    kind = kind.lower()
    if kind not in accepted:
        raise BadInput(415, f"Content-Type {_short(kind, 80)} is not accepted here; send {want}")
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise BadInput(
                415, f"charset {_short(value.strip(), 40)} is not accepted; send UTF-8 ({kind}; charset=utf-8)"
            )
    return kind


async def read_limited(chunks: AsyncIterator[bytes], *, content_length: str | None, limit: int) -> bytes:
    """The whole body, refused with a 413 as soon as it is known to exceed ``limit`` bytes (nothing more is kept)."""
    too_big = f"the request body is over the server's limit of {limit} bytes; send fewer rows per request"
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise BadInput(413, too_big)
    parts, total = [], 0
    try:
        async for chunk in chunks:
            total += len(chunk)
            if total > limit:
                raise BadInput(413, too_big)
            parts.append(chunk)
    except ClientDisconnect:  # nobody reads the answer; the access log records the 400
        raise BadInput(400, "the client disconnected before the whole body arrived") from None
    body = b"".join(parts)
    if not body.strip():
        raise BadInput(400, "the request body is empty; send rows (see GET /metadata for the input schema)")
    return body


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(400, f"the request body is not valid UTF-8 (byte {exc.start}); encode it as UTF-8") from None


def parse_json(body: bytes) -> Any:
    """Decode a JSON body; numbers become floats, ``NaN``/``Infinity`` literals are kept as markers to refuse by name.

    Raises
    ------
    BadInput
        400 for invalid UTF-8, invalid or too deeply nested JSON.
    """
    text = _text(body)
    try:
        # parse_int=float: an integer of any length becomes a float (no int digit limit, no slow big ints).
        return json.loads(text, parse_constant=_NonFinite, parse_int=float)
    except RecursionError:
        raise BadInput(
            400, 'the JSON body is nested too deeply; send a flat {"rows": [...]} or {"images": [...]}'
        ) from None
    except json.JSONDecodeError as exc:
        raise BadInput(
            400, f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None


def _only_key(obj: Any, key: str, served: ServedModel) -> list:
    example = '{"rows": [{"column": number, ...}]}' if key == "rows" else '{"images": [[[pixel, ...], ...], ...]}'
    if not isinstance(obj, dict):
        raise BadInput(422, f"the body must be a JSON object {example} for the {served.name}; got a {_kind(obj)}")
    extra = [k for k in obj if k != key]
    if extra:
        raise BadInput(422, f"unknown field {_short(extra[0])} in the body; the {served.name} takes {example}")
    if key not in obj:
        raise BadInput(422, f"the body lacks the field {key!r}; the {served.name} takes {example}")
    value = obj[key]
    if not isinstance(value, list):
        raise BadInput(422, f"field {key!r} must be a list; got a {_kind(value)}: the {served.name} takes {example}")
    if not value:
        raise BadInput(422, f"field {key!r} is empty; send at least one")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, _NonFinite):
        return f"{value.literal} literal"
    return {dict: "JSON object", list: "JSON array", str: "string", bool: "boolean", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _check_count(n: int, max_rows: int, what: str, flag: str) -> None:
    if n > max_rows:
        raise BadInput(413, f"{n} {what} in one request; this server takes at most {max_rows} here (its {flag})")


def rows_from_json(obj: Any, served: ServedModel, *, max_rows: int, limit_flag: str = "--max-rows") -> np.ndarray:
    """``{"rows": [{column: number}]}`` -> (n, F) float64 raw rows, checked by :func:`pipeline.predict_inputs.finite_table`.

    ``null`` is a missing value: imputed when the run was trained with ``data.nan_policy='impute'``,
    refused otherwise (as an empty CSV cell is by ``predict``).

    Raises
    ------
    BadInput
        422 naming ``rows[i]`` and the column for a missing, extra or mistyped value; 413 past ``max_rows``.
    """
    rows = _only_key(obj, "rows", served)
    _check_count(len(rows), max_rows, "rows", limit_flag)
    features = list(served.feature_names)
    wanted = set(features)
    impute = served.preprocessing.get("imputed_medians") is not None
    for i, row in enumerate(rows):
        if type(row) is not dict:
            raise BadInput(422, f"rows[{i}] is a {_kind(row)}; each row is an object {{column: number}}")
        if row.keys() != wanted:
            long = next((k for k in row if len(k) > MAX_NAME_CHARS), None)
            if long is not None:
                raise BadInput(
                    422,
                    f"rows[{i}] has a {len(long)}-character column name; the {served.name} needs: {', '.join(features)}",
                )
            try:
                predict_inputs.check_columns(
                    list(row), served, where=f"rows[{i}]", extra_fix="remove them from the row"
                )
            except DataError as exc:
                raise BadInput(422, str(exc)) from None
    get = operator.itemgetter(*features)
    values = [get(row) for row in rows] if len(features) > 1 else [(get(row),) for row in rows]  # training order
    if set(map(type, itertools.chain.from_iterable(values))) != {float}:  # one C-level pass in the common case
        for i, row_values in enumerate(values):
            for c, v in zip(features, row_values):
                if type(v) is not float and not (v is None and impute):
                    raise BadInput(422, _bad_cell(f"rows[{i}][{c!r}]", v, impute))
        values = [tuple(math.nan if v is None else v for v in row_values) for row_values in values]
    x = np.array(values, dtype=np.float64)  # (n, F) in training column order
    if not impute:
        bad = np.argwhere(~np.isfinite(x))
        if len(bad):
            i, c = map(int, bad[0])
            raise BadInput(422, _bad_cell(f"rows[{i}][{features[c]!r}]", float(x[i, c]), impute))
    try:  # imputation and range, as predict checks a CSV's numbers
        return predict_inputs.finite_table(x, served, where="the JSON rows (data row 1 is rows[0])")
    except DataError as exc:
        raise BadInput(422, str(exc)) from None


def _bad_cell(where: str, value: Any, impute: bool) -> str:
    missing = "; null marks a missing value" if impute else ""
    if value is None:
        return f"{where} is null; send a number (the run was not trained with data.nan_policy='impute')"
    if isinstance(value, (_NonFinite, float)):
        shown = value.literal if isinstance(value, _NonFinite) else repr(value)
        return f"{where} is {shown}, not a finite number; send a finite number{missing}"
    return f"{where} is a {_kind(value)} ({_short(value)}); send a number{missing}"


def rows_from_csv(body: bytes, served: ServedModel, *, max_rows: int, limit_flag: str = "--max-rows") -> np.ndarray:
    """A ``text/csv`` body (a header with the training columns, in any order) -> (n, F) float64 raw rows.

    Parsed by pandas as ``predict`` parses a CSV file (the same numbers), after
    :func:`pipeline.predict_inputs.check_field_counts` has checked every line has as many fields as the header.

    Raises
    ------
    BadInput
        400 for invalid UTF-8 or CSV; 422 naming the line, column or data row; 413 past ``max_rows``.
    """
    import pandas as pd

    text = _text(body).removeprefix("\ufeff")  # a byte-order mark is not part of the first column's name
    try:
        predict_inputs.check_field_counts(io.StringIO(text, newline=""), where="the CSV body")
        records = csv.reader(io.StringIO(text, newline=""))
        header = next(records, None)
        n = sum(1 for r in records if r)  # data rows (blank lines skipped, as pandas does)
    except DataError as exc:
        raise BadInput(422, str(exc)) from None
    except csv.Error as exc:
        raise BadInput(400, f"the CSV body cannot be parsed ({exc})") from None
    if not header:
        raise BadInput(400, "the CSV body has no header line; send the column names first")
    long = next((h for h in header if len(h) > MAX_NAME_CHARS), None)
    if long is not None:
        raise BadInput(
            422,
            f"the CSV header has a {len(long)}-character column name; the {served.name} needs: {', '.join(served.feature_names)}",
        )
    dup = next((h for i, h in enumerate(header) if h in header[:i]), None)
    if dup is not None:
        raise BadInput(422, f"column {dup!r} appears twice in the CSV header; send each column once")
    try:
        predict_inputs.check_columns(header, served, where="the CSV body", extra_fix="remove them from the body")
    except DataError as exc:
        raise BadInput(422, str(exc)) from None
    if n == 0:
        raise BadInput(422, "the CSV body has a header but no rows; send at least one row")
    _check_count(n, max_rows, "rows", limit_flag)
    try:
        frame = pd.read_csv(io.StringIO(text), usecols=list(served.feature_names))  # as predict_inputs.iter_table reads
        return predict_inputs.table_values(frame, served, where="the CSV body")
    except DataError as exc:
        raise BadInput(422, str(exc)) from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise BadInput(
            400, f"the CSV body cannot be parsed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None


def images_from_json(obj: Any, served: ServedModel, *, max_rows: int, limit_flag: str = "--max-rows") -> np.ndarray:
    """``{"images": nested lists}`` of shape (N, H, W) or (N, C, H, W) -> (N, C, H, W) float64 raw pixels.

    Raises
    ------
    BadInput
        422 naming ``images[i]...`` for ragged lists, non-numbers, non-finite values or a shape
        other than training's; 413 past ``max_rows``.
    """
    images = _only_key(obj, "images", served)
    _check_count(len(images), max_rows, "images", limit_flag)
    try:
        x = np.array(images)
    except (ValueError, TypeError, OverflowError):
        raise BadInput(422, _ragged(images, served)) from None
    if x.dtype.kind == "O":  # numbers mixed with something else: null is a missing pixel, the rest is refused
        for idx in np.ndindex(x.shape):
            v = x[idx]
            if type(v) is not float and v is not None:
                raise BadInput(
                    422, f"images{''.join(f'[{i}]' for i in idx)} is a {_kind(v)} ({_short(v)}); pixels are numbers"
                )
        x = x.astype(np.float64)  # null -> NaN: imputed or refused below, as predict treats NaN pixels
    elif x.dtype.kind != "f":
        kind = {"U": "strings", "b": "booleans"}.get(x.dtype.kind, f"values of type {x.dtype}")
        raise BadInput(422, f"'images' holds {kind}; pixels are numbers")
    try:  # shape, channels, NaN/inf (imputed or refused) and range, as predict checks an image file
        return predict_inputs.check_images(x, served, what="'images'", first_index=0)
    except DataError as exc:
        raise BadInput(422, str(exc)) from None


def _ragged(images: list, served: ServedModel) -> str:
    one = f"({', '.join(map(str, served.input_shape))})"
    first = None
    for i, image in enumerate(images):
        try:
            shape = np.array(image).shape
        except (ValueError, TypeError, OverflowError):
            return f"images[{i}] is ragged (its rows or channels differ in length); each image is {one} nested lists"
        if first is None:
            first = shape
        elif shape != first:
            return f"images[{i}] has shape {shape} but images[0] has {first}; every image must be {one}"
    return f"'images' cannot be read as an array of (N, {one[1:]} images"
