"""A data dictionary for the table (``data.codebook``): what a coded value means and which units a column has.

A codebook is a JSON or TOML file mapping a column of the table (a feature or the target) to its
``codes`` (value -> label) and/or ``units``::

    [sex]
    codes = { "1" = "female", "2" = "male" }

    [age]
    units = "years"

It is read and checked once, at the edge (the data stage), and travels with the prepared dataset
in a normalised form (``{column: {"units": str, "codes": [[value, label], ...]}}``) so every place
that shows a value — subgroup tables and error cohorts (evaluate), the report, the model cards,
``predict``'s provenance — labels it the same way without reading the file again.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping

from auditml_core.errors import DataError

Codebook = dict[str, dict[str, Any]]  # normalised: column -> {"units": str, "codes": [[float, str], ...]}
ENTRY_KEYS = ("codes", "units")


def load_codebook(path: str, columns: Iterable[str]) -> tuple[Codebook, dict[str, Any]]:
    """Read and check the codebook at ``path`` against the table's ``columns``.

    Parameters
    ----------
    path : a ``.json`` or ``.toml`` file; ``""`` = no codebook.
    columns : the table's feature and target names.

    Returns
    -------
    (codebook, provenance)
        The normalised codebook (empty for ``""``) and ``{"source", "sha256"}`` of the file.

    Raises
    ------
    DataError
        A missing or unparsable file, a column the table does not have, an entry with other keys than
        ``codes`` and ``units``, a code that is not a number, or a label or unit that is not text.
    """
    if not path:
        return {}, {}
    import hashlib

    p = Path(path)
    where = f"data.codebook {path!r}"
    if not p.is_file():
        raise DataError(f"{where} does not exist; set data.codebook to a .json or .toml data dictionary, or to ''")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
        tree = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "TOML" if p.suffix.lower() == ".toml" else "JSON"
        raise DataError(f"{where} is not valid {kind} ({str(exc).splitlines()[0]}); fix its syntax") from None
    if not isinstance(tree, Mapping):
        raise DataError(f'{where} must map column names to entries, e.g. {{"sex": {{"codes": {{"1": "female"}}}}}}')
    columns = [str(c) for c in columns]
    out: Codebook = {}
    for column, entry in tree.items():
        if column not in columns:
            raise DataError(
                f"{where} describes column {column!r}, which the table does not have; its columns are: "
                f"{', '.join(columns[:20])}"
            )
        if not isinstance(entry, Mapping) or not entry or set(entry) - set(ENTRY_KEYS):
            raise DataError(
                f"{where}: the entry of {column!r} must hold 'codes' (value -> label) and/or 'units' (text) and "
                f"nothing else; got {entry!r}"[:400]
            )
        units = entry.get("units", "")
        if not isinstance(units, str):
            raise DataError(f'{where}: units of {column!r} must be text, e.g. "years"; got {units!r}')
        codes = entry.get("codes", {})
        if not isinstance(codes, Mapping):
            raise DataError(f'{where}: codes of {column!r} must map values to labels, e.g. {{"1": "female"}}')
        pairs: list[list[Any]] = []
        for code, label in codes.items():
            try:
                value = float(code)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise DataError(
                    f"{where}: code {code!r} of {column!r} is not a number; codes are the numeric values in the "
                    'table (write them as strings in JSON/TOML keys, e.g. "1")'
                )
            if not isinstance(label, str) or not label.strip():
                raise DataError(f"{where}: the label of code {code!r} of {column!r} must be non-empty text")
            if any(math.isclose(value, v, rel_tol=1e-9, abs_tol=1e-12) for v, _ in pairs):
                raise DataError(f"{where}: code {code!r} of {column!r} is listed twice; give each value one label")
            pairs.append([value, label.strip()])
        out[str(column)] = {"units": units.strip(), "codes": sorted(pairs)}
    return out, {"source": str(p), "sha256": hashlib.sha256(raw).hexdigest()}


def code_label(codebook: Mapping[str, Any] | None, column: str, value: float) -> str | None:
    """The label of ``value`` in ``column``'s codes, or None when the column has none for it."""
    for code, label in ((codebook or {}).get(column) or {}).get("codes") or []:
        if math.isclose(float(value), float(code), rel_tol=1e-6, abs_tol=1e-9):
            return str(label)
    return None


def units(codebook: Mapping[str, Any] | None, column: str) -> str:
    """``column``'s units, or ""."""
    return str(((codebook or {}).get(column) or {}).get("units") or "")


def show_value(codebook: Mapping[str, Any] | None, column: str, value: float) -> str:
    """A value as a reader should see it: ``female (1)`` for a coded value, ``63 years`` with units, else ``63``."""
    label = code_label(codebook, column, value)
    if label is not None:
        return f"{label} ({value:.4g})"
    unit = units(codebook, column)
    return f"{value:.4g} {unit}" if unit else f"{value:.4g}"


def show_condition(codebook: Mapping[str, Any] | None, column: str, op: str, threshold: float) -> str:
    """A split rule ``column op threshold`` as a reader should see it.

    For a coded column, the labels on that side of the threshold (``sex = female``, ``grade in {I, II}``);
    otherwise the threshold with the column's units (``bmi <= 27.3 kg/m²``).
    """
    codes = ((codebook or {}).get(column) or {}).get("codes") or []
    if codes:
        side = [str(lab) for v, lab in codes if (float(v) <= threshold if op == "<=" else float(v) > threshold)]
        if len(side) == 1:
            return f"{column} = {side[0]}"
        if side:
            return f"{column} in {{{', '.join(side)}}}"
    unit = units(codebook, column)
    return f"{column} {op} {threshold:.4g}" + (f" {unit}" if unit else "")


def describe(codebook: Mapping[str, Any] | None) -> list[tuple[str, str, str]]:
    """One ``(column, units, "1 = female, 2 = male")`` row per codebook entry, for tables in reports and cards."""
    return [
        (column, str(entry.get("units") or ""), ", ".join(f"{v:g} = {lab}" for v, lab in entry.get("codes") or []))
        for column, entry in (codebook or {}).items()
    ]
