"""Reading ``predict``'s (and ``serve``'s) inputs: raw tables and images in the units of the training data.

Every check refuses with a one-line :class:`DataError` naming the file, the column or image, the data
row and the fix: a missing or unexpected column, a ragged line, a non-numeric, empty or non-finite
value (unless the run imputes), a value too large to standardise, an image of the wrong shape. Files
are read in chunks (``--chunk-rows``), so memory is bounded by the chunk, not by the input.
"""

from __future__ import annotations

import csv
import gzip
import itertools
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import numpy as np

from auditml_core.datasets import IMAGE_SUFFIXES, decode_image
from auditml_core.errors import DataError
from pipeline.predict_model import ServedModel

DEFAULT_CHUNK_ROWS = 65_536  # rows (or images) read, predicted and written at a time


def check_columns(
    header: list[str], served: ServedModel, *, where: str, ignore: tuple[str, ...] = (), extra_fix: str = ""
) -> None:
    """Refuse a table whose header lacks a training column or has one the model was not trained on.

    ``where`` names the table in the message (a quoted path, or "the request body");
    ``extra_fix`` replaces the default advice for extra columns (``--ignore-columns``).

    Raises
    ------
    DataError
        Naming the missing or unexpected columns and the fix.
    """
    features = list(served.feature_names)
    missing = [f for f in features if f not in header]
    if missing:
        raise DataError(
            f"{where} lacks training column(s) {', '.join(map(repr, missing))}; "
            f"the {served.name} needs: {', '.join(features)}"
        )
    extra = [c for c in header if c not in features and c not in ignore]
    if extra:
        raise DataError(
            f"{where} has column(s) the model was not trained on: {', '.join(map(repr, extra[:5]))}; "
            + (extra_fix or f"drop them or name them with --ignore-columns {','.join(extra[:5])}")
        )


def table_values(chunk: Any, served: ServedModel, *, where: str, offset: int = 0) -> np.ndarray:
    """(n, F) float64 of a pandas chunk's training columns, in training order, validated.

    Empty or non-finite cells take the run's recorded train-split medians when it was trained
    with ``data.nan_policy='impute'``; otherwise they are refused. ``offset`` is the number of
    data rows before this chunk (messages count data rows from 1).

    Raises
    ------
    DataError
        A non-numeric value, an empty/non-finite one without imputation, or one too large to
        standardise (1e308: it would give an empty prediction), naming the column and the data row.
    """
    import pandas as pd

    features = list(served.feature_names)
    for col in features:
        values = chunk[col]
        if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
            bad = pd.to_numeric(values, errors="coerce").isna() & values.notna()
            if pd.api.types.is_bool_dtype(values) or bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0]) if bad.any() else 0
                raise DataError(
                    f"column {col!r} of {where} is not numeric: data row {offset + i + 1} holds "
                    f"{values.iloc[i]!r}; encode it as a number as in training"
                )
    x = chunk[features].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    return finite_table(x, served, where=where, offset=offset)


def finite_table(x: np.ndarray, served: ServedModel, *, where: str, offset: int = 0) -> np.ndarray:
    """(n, F) float64 raw rows in training column order, validated as :func:`table_values` does after parsing.

    For callers that hold numbers already (``serve``'s JSON rows): no pandas on the way.

    Raises
    ------
    DataError
        An empty/non-finite value without imputation, or one too large to standardise, naming the
        column and the data row.
    """
    features = list(served.feature_names)
    nan = ~np.isfinite(x)
    if nan.any():
        medians = served.preprocessing.get("imputed_medians")
        if medians is None:
            r, c = map(int, np.argwhere(nan)[0])
            raise DataError(
                f"column {features[c]!r} of {where} is empty or not finite at data row {offset + r + 1}; "
                "fill it (the run was not trained with data.nan_policy='impute')"
            )
        x = np.where(nan, np.asarray(medians)[None, :], x)  # the run's recorded train-split medians
    p = served.preprocessing
    with np.errstate(over="ignore", invalid="ignore"):  # detected below, by name
        scaled = ((x - np.asarray(p["x_mean"])) / np.asarray(p["x_std"])).astype(np.float32)
    overflow = ~np.isfinite(scaled)
    if overflow.any():
        r, c = map(int, np.argwhere(overflow)[0])
        raise DataError(
            f"column {features[c]!r} of {where} holds {x[r, c]:g} at data row {offset + r + 1}, too large for the model "
            f"once standardised (training: mean {p['x_mean'][c]:.4g}, spread {p['x_std'][c]:.4g}); check the value "
            "and its units"
        )
    return x


def iter_table(
    path: Path, served: ServedModel, *, ignore: tuple[str, ...] = (), chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[np.ndarray]:
    """Yield (n, F) float64 chunks of a CSV's training columns, in training order.

    Raises
    ------
    DataError
        A training column missing, an unexpected column not named in ``ignore``, a non-numeric
        or empty value (naming the column and the data row), or an unparsable file.
    """
    import pandas as pd

    try:
        header = [str(c) for c in pd.read_csv(path, nrows=0).columns]
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{str(path)!r} cannot be read as CSV ({str(exc).splitlines()[0]}); check the file") from None
    check_columns(header, served, where=repr(str(path)), ignore=ignore)
    with _open_text(path) as fh:
        check_field_counts(fh, where=repr(str(path)))
    offset = 0
    try:
        reader = pd.read_csv(path, usecols=list(served.feature_names), chunksize=chunk_rows)
        for chunk in reader:
            x = table_values(chunk, served, where=repr(str(path)), offset=offset)
            offset += len(x)
            yield x
    except pd.errors.ParserError as exc:
        raise DataError(f"{str(path)!r} cannot be parsed near data row {offset + 1} ({exc}); check the file") from None


def check_field_counts(lines: Iterable[str], *, where: str) -> None:
    """Refuse a CSV whose data rows have more or fewer fields than its header (ragged rows).

    pandas reads the training columns by name (``usecols``), and a row with one field too many
    would be read with its values shifted by one column; one with too few gets empty cells that
    imputation would silently fill. Blank lines are skipped, as pandas does. Lines without a
    quote are checked by counting commas (about twice as fast as the csv module on a million
    rows); from the first quote on, the csv module reads the rest (a quoted field may hold commas
    or line breaks).

    Raises
    ------
    DataError
        Naming the first ragged row's line number (1 = the header), its field count and the header's.
    """
    rest = iter(lines)
    header = next(rest, None)
    if header is None:
        return
    if '"' in header:
        _check_quoted_fields(itertools.chain([header], rest), where=where, expected=None, first_line=1)
        return
    expected = header.count(",") + 1
    for number, line in enumerate(rest, start=2):
        if '"' in line:
            _check_quoted_fields(itertools.chain([line], rest), where=where, expected=expected, first_line=number)
            return
        body = line.rstrip("\r\n")
        if body and body.count(",") + 1 != expected:
            raise _ragged(where, number, body.count(",") + 1, expected)


def _check_quoted_fields(lines: Iterable[str], *, where: str, expected: int | None, first_line: int) -> None:
    """:func:`check_field_counts` by the csv module, from line ``first_line`` on (``expected`` None: a header first)."""
    reader = csv.reader(lines)
    if expected is None:
        expected = len(next(reader, []))
    for row in reader:
        if row and len(row) != expected:
            raise _ragged(where, first_line - 1 + reader.line_num, len(row), expected)


def _ragged(where: str, line: int, fields: int, expected: int) -> DataError:
    return DataError(
        f"line {line} of {where} has {fields} fields but the header has {expected}; a missing or stray delimiter "
        "shifts every value after it: fix that row"
    )


def _open_text(path: Path) -> IO[str]:
    """``path`` as text for the csv module (gzip when it ends in .gz, as pandas infers)."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8", errors="replace")
    return path.open("r", newline="", encoding="utf-8", errors="replace")


def check_images(x: np.ndarray, served: ServedModel, *, what: str, first_index: int | None = 0) -> np.ndarray:
    """Images of the training shape: (N, H, W) gets its channel axis when the model has one channel.

    Returns (N, C, H, W) float64 pixels, validated as the training images were: real numbers (no
    complex, boolean or object arrays), finite (NaN/inf pixels take the run's train-split channel
    mean when it was trained with ``data.nan_policy='impute'``, as training did; otherwise they are
    refused), and small enough to standardise. ``first_index`` is the index of ``x[0]`` in the
    whole input, for messages (None: a single named image).

    Raises
    ------
    DataError
        ``what`` (the images' name in the message) has another (C, H, W) than training, is not real
        numbers, or has a non-finite or overflowing pixel (naming the image index).
    """
    want = tuple(served.input_shape)
    if x.ndim == 3 and want[0] == 1:
        x = x[:, None]
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise DataError(
            f"{what} has shape {tuple(x.shape)}; the {served.name} was trained on (N, {', '.join(map(str, want))}) "
            f"images ({want[0]} channel(s), {want[1]}x{want[2]} pixels): convert and resize them first"
        )
    if x.dtype.kind not in "iuf":
        raise DataError(f"{what} has dtype {x.dtype}; images must be real numbers (integer or float), as in training")
    x = np.asarray(x, dtype=np.float64)
    p = served.preprocessing
    mean, std = np.asarray(p["channel_mean"]), np.asarray(p["channel_std"])

    def image(i: int) -> str:
        return what if first_index is None else f"{what}, image {first_index + i} (counting from 0)"

    finite = np.isfinite(x)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))
        if p.get("nan_policy") != "impute":
            raise DataError(
                f"{image(int(bad[0]))} has NaN or inf pixels ({len(bad)} such image(s) here); replace them "
                "(the run was not trained with data.nan_policy='impute')"
            )
        x = np.where(finite, x, mean[None, :, None, None])  # as training filled them: the train-split channel mean
    with np.errstate(over="ignore", invalid="ignore"):  # detected below, by name
        scaled = ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    overflow = ~np.isfinite(scaled)
    if overflow.any():
        i, c, h, w = map(int, np.argwhere(overflow)[0])
        raise DataError(
            f"{image(i)} has pixel value {x[i, c, h, w]:g}, too large for the model once standardised (training: "
            f"channel mean {mean[c]:.4g}, spread {std[c]:.4g}); rescale the images as in training"
        )
    return x


def iter_images(
    path: Path, served: ServedModel, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, digest: Any = None
) -> Iterator[tuple[list, np.ndarray]]:
    """Yield ``(ids, (n, C, H, W) float64)`` chunks from an .npz (array ``x``), .npy or a folder of images.

    ``.npy`` files are memory-mapped; image folders are decoded chunk by chunk (files sorted by
    relative path, sub-folders included); ``digest`` (a hashlib object) is fed the folder's bytes.

    Raises
    ------
    DataError
        An unreadable file, a missing ``x`` array, or images whose (C, H, W) differ from training.
    """
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"folder {str(path)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        for i in range(0, len(files), chunk_rows):
            ids, arrays = [], []
            for f in files[i : i + chunk_rows]:
                rel, data = f.relative_to(path).as_posix(), f.read_bytes()
                if digest is not None:
                    digest.update(rel.encode() + b"\0" + data)
                ids.append(rel)
                arrays.append(
                    check_images(
                        decode_image(data, name=str(f))[None], served, what=f"image {rel!r}", first_index=None
                    )[0]
                )
            yield ids, np.stack(arrays)
        return
    if path.suffix not in (".npz", ".npy"):
        raise DataError(f"{str(path)!r} is not an .npz/.npy array or a folder of images; save images with numpy.savez")
    try:
        if path.suffix == ".npy":
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as archive:
                if "x" not in archive.files:
                    raise DataError(
                        f"{str(path)!r} has no array 'x' (it has: {', '.join(archive.files) or 'none'}); save the images as x"
                    )
                x = archive["x"]
    except (ValueError, OSError) as exc:
        raise DataError(f"{str(path)!r} is not a readable array file without pickles ({exc})") from None
    what = f"x in {str(path)!r}"
    check_images(x[:0], served, what=what)  # shape and dtype, before any chunk (a memory-mapped .npy is not read)
    for i in range(0, len(x), chunk_rows):
        yield (
            list(range(i, min(i + chunk_rows, len(x)))),
            check_images(x[i : i + chunk_rows], served, what=what, first_index=i),
        )
