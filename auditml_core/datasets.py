"""Reading and validating raw data at the edge: embedded scikit-learn tables, CSV, .npz, image folders.

Every function returns plain arrays plus a provenance record, or raises
:class:`DataError` with a message that names the problem and the fix.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from auditml_core.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class RawTable:
    """A numeric table before splitting."""

    x: np.ndarray  # (N, F) float64
    y: np.ndarray  # (N,) float64
    feature_names: tuple[str, ...]
    target_name: str
    provenance: dict[str, Any]


@dataclass(frozen=True)
class RawImages:
    """Labelled images before splitting."""

    x: np.ndarray  # (N, C, H, W) float64, raw intensities
    y: np.ndarray  # (N,) int64 class index into class_names
    class_names: tuple[str, ...]
    provenance: dict[str, Any]
    groups: np.ndarray | None = None  # (N,) str labels of the .npz's optional ``group`` array (per-group metrics)


MAX_GROUPS = 20  # distinct values a ``group`` array may hold: a few groups to compare, not an identifier per row


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _array_digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def load_table(
    csv_path: str, target: str, *, ignore_columns: tuple[str, ...] = (), identifier_check: bool = True
) -> RawTable:
    """Load the regressor's table: scikit-learn's diabetes data when ``csv_path`` is empty, else a CSV.

    Parameters
    ----------
    csv_path, target : the CSV and its target column (``data.tabular_csv``, ``data.target``).
    ignore_columns : columns left out of the features (``data.ignore_columns``).
    identifier_check : refuse feature columns that look like row identifiers (:func:`likely_identifiers`).

    Raises
    ------
    DataError
        Missing file, unreadable CSV, missing target column, non-numeric columns, no rows, an ignored
        column that is not in the table or is the target, a likely identifier column.
    """
    if not csv_path:
        return _diabetes_table(ignore_columns)
    path, raw, frame, header = _read_csv(csv_path)
    _check_columns(frame, header, csv_path=csv_path, target=target, ignore_columns=ignore_columns)
    features = [c for c in frame.columns if c != target and str(c) not in ignore_columns]
    if not features:
        raise DataError(f"{csv_path!r} has only the target column {target!r}; add at least one feature column")
    x = frame[features].to_numpy(dtype=np.float64)
    feature_names = tuple(str(c) for c in features)
    if identifier_check and (found := likely_identifiers(x, feature_names)):
        listed = ", ".join(f"{n!r} ({why})" for n, why in found)
        fix = ", ".join(f'"{n}"' for n in (*ignore_columns, *(n for n, _ in found)))
        raise DataError(
            f"column(s) {listed} of {csv_path!r} look like row identifiers, which a model would learn as if they "
            f"were features; leave them out with data.ignore_columns='[{fix}]' (or set data.identifier_check=false "
            "if they are real features)"
        )
    return RawTable(
        x=x,
        y=frame[target].to_numpy(dtype=np.float64),
        feature_names=feature_names,
        target_name=str(target),
        provenance={
            "source": str(path),
            "sha256": sha256_bytes(raw),
            "rows": int(len(frame)),
            "columns": int(frame.shape[1]),
        }
        | ({"ignored_columns": list(ignore_columns)} if ignore_columns else {}),
    )


def _diabetes_table(ignore_columns: tuple[str, ...]) -> RawTable:
    """scikit-learn's embedded diabetes table, without ``ignore_columns``."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    x, y = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.float64)
    names = [str(n) for n in bunch.feature_names]
    _check_ignored(ignore_columns, names, "disease_progression", "the embedded diabetes table")
    keep = [j for j, n in enumerate(names) if n not in ignore_columns]
    return RawTable(
        x=x[:, keep],
        y=y,
        feature_names=tuple(names[j] for j in keep),
        target_name="disease_progression",
        provenance={
            "source": "sklearn.datasets.load_diabetes (embedded, ships with scikit-learn)",
            "sha256_of_arrays": _array_digest(x, y),
            "rows": int(x.shape[0]),
            "columns": int(x.shape[1]) + 1,
        }
        | ({"ignored_columns": list(ignore_columns)} if ignore_columns else {}),
    )


def _read_csv(csv_path: str) -> tuple[Path, bytes, Any, list[str]]:
    """The CSV's path, bytes, frame (pandas) and column names as written in its header.

    Raises
    ------
    DataError
        A directory, a missing or unreadable file, a CSV pandas cannot parse.
    """
    import pandas as pd

    path = Path(csv_path)
    if path.is_dir():
        raise DataError(f"data.tabular_csv {csv_path!r} is a directory; set it to a CSV file")
    if not path.is_file():
        raise DataError(f"CSV file {csv_path!r} does not exist; set data.tabular_csv to an existing file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"CSV file {csv_path!r} cannot be read ({exc.strerror or exc}); check its permissions"
        ) from None
    try:
        frame = pd.read_csv(io.BytesIO(raw))
        # pandas renames a repeated column name ("y", "y" -> "y", "y.1"): read the header as written.
        header = pd.read_csv(io.BytesIO(raw), header=None, nrows=1, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(
            f"CSV file {csv_path!r} cannot be parsed ({(str(exc).splitlines() or [type(exc).__name__])[0]}); "
            "check its delimiter and quoting"
        ) from None
    names = [str(v) for v in header.iloc[0].tolist()] if len(header) else []
    return path, raw, frame, names


def _check_columns(
    frame: Any, names: list[str], *, csv_path: str, target: str, ignore_columns: tuple[str, ...]
) -> None:
    """Refuse repeated column names, a missing target, no rows, wrong ignored columns, non-numeric features."""
    import pandas as pd

    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise DataError(
            f"CSV file {csv_path!r} repeats column name(s) {', '.join(map(repr, duplicated))}; give every column "
            "a unique name (a repeated target column would be trained on as a feature)"
        )
    if target not in frame.columns:
        shown = ", ".join(map(str, list(frame.columns)[:20]))
        raise DataError(f"target column {target!r} is not in {csv_path!r}; set data.target to one of: {shown}")
    if len(frame) == 0:
        raise DataError(f"CSV file {csv_path!r} has no data rows; supply a table with at least a few rows")
    _check_ignored(ignore_columns, [str(c) for c in frame.columns], target, repr(csv_path))
    non_numeric = [
        str(c)
        for c in frame.columns
        if str(c) not in ignore_columns
        and (not pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))
    ]
    if non_numeric:
        raise DataError(
            f"column(s) {', '.join(map(repr, non_numeric[:5]))} of {csv_path!r} are not numeric; "
            "encode them as numbers (e.g. one-hot) or leave them out with data.ignore_columns"
        )


# Names that say "row identifier" (case-insensitive, whole name): id, uuid, index, row, row_id, Unnamed: 0 (pandas'
# name for a saved index), and names ending in "_id" / " id" / "Id" (patient_id, visitId).
_IDENTIFIER_NAME = re.compile(r"(?i:id|uuid|guid|index|idx|row|row_?(id|num|number|no)|unnamed: ?0|.*[_ .-]id)")
_CAMEL_ID = re.compile(r".*[a-z0-9](Id|ID)")
MIN_ROWS_FOR_ORDER = 5  # a unique monotone integer column is an identifier only over at least this many rows


def likely_identifiers(x: np.ndarray, names: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """Feature columns that look like row identifiers, each with why: its name, or its values.

    A column is flagged when its name says so (``id``, ``ID``, ``uuid``, ``index``, ``row``, ``patient_id``,
    ``visitId``, pandas' ``Unnamed: 0``) or when its values are integers, unique per row and strictly
    monotone over at least :data:`MIN_ROWS_FOR_ORDER` rows (a row number or a running counter).

    Parameters
    ----------
    x : ``(N, F)`` feature values.
    names : the ``F`` column names.

    Returns
    -------
    list of (name, reason), in column order; empty when none looks like an identifier.
    """
    found = []
    for j, name in enumerate(names):
        if _IDENTIFIER_NAME.fullmatch(name.strip()) or _CAMEL_ID.fullmatch(name.strip()):
            found.append((name, "named like an identifier"))
            continue
        col = x[:, j]
        if len(col) < MIN_ROWS_FOR_ORDER or not np.isfinite(col).all() or not np.all(col == np.round(col)):
            continue
        step = np.diff(col)
        if (step > 0).all() or (step < 0).all():
            found.append((name, "unique integers in row order"))
    return found


def _check_ignored(ignore: tuple[str, ...], columns: list[str], target: str, where: str) -> None:
    """Refuse ``data.ignore_columns`` entries that are not columns of the table, or that name the target."""
    missing = [c for c in ignore if c not in columns]
    if missing:
        raise DataError(
            f"data.ignore_columns names {', '.join(map(repr, missing))}, not a column of {where}; "
            f"its columns are: {', '.join(columns[:20])}"
        )
    if target in ignore:
        raise DataError(
            f"data.ignore_columns names the target column {target!r}; remove it from the list (data.target is "
            "never a feature)"
        )


def load_images(spec: str) -> RawImages:
    """Load the CNN's images: 8x8 digits when ``spec`` is empty, an ``.npz`` file, or a folder of class folders.

    Raises
    ------
    DataError
        Missing file, wrong keys or ranks, mismatched lengths, unreadable or differently sized images.
    """
    if not spec:
        return _digits()
    path = Path(spec)
    if path.is_dir():
        return _load_image_folder(path)
    if not path.is_file():
        raise DataError(
            f"image data {spec!r} does not exist; set data.images to an .npz file or a folder of class folders"
        )
    if path.suffix != ".npz":
        raise DataError(
            f"image data {spec!r} is neither an .npz file nor a folder; save arrays x and y with numpy.savez"
        )
    x, y, groups, digest = _read_npz(path, spec)
    x = _checked_images(x, y, spec)
    labels, y_index = np.unique(y, return_inverse=True)
    return RawImages(
        x=np.asarray(x, dtype=np.float64),
        y=y_index.astype(np.int64),
        class_names=tuple(str(v) for v in labels),
        provenance={"source": str(path), "sha256": digest, "rows": int(len(y)), "shape": list(x.shape[1:])},
        groups=None if groups is None else _check_groups(groups, len(y), spec),
    )


def _digits() -> RawImages:
    """scikit-learn's embedded 8x8 digits."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float64)[:, None]  # (N, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    return RawImages(
        x=x,
        y=y,
        class_names=tuple(str(c) for c in range(10)),
        provenance={
            "source": "sklearn.datasets.load_digits (embedded, ships with scikit-learn)",
            "sha256_of_arrays": _array_digest(x, y),
            "rows": int(len(y)),
            "shape": list(x.shape[1:]),
        },
    )


def _read_npz(path: Path, spec: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """Arrays ``x``, ``y`` and the optional ``group`` of an .npz archive, and the file's SHA-256.

    Raises
    ------
    DataError
        Not an .npz archive, missing arrays, pickled objects, a corrupt file, a file that changed while read.
    """
    # Hashed as a stream and the arrays read from the file: no copy of its bytes is held. A file that
    # changes in between is refused (size and modification time before the hash, after the read).
    before = path.stat()
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a lone .npy array under an .npz name
            raise DataError(f"{spec!r} holds one .npy array, not an .npz archive; save x and y with numpy.savez")
        with loaded as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise DataError(
                    f"{spec!r} lacks array(s) {', '.join(missing)}; it has {', '.join(archive.files) or 'none'}; save x (images) and y (labels)"
                )
            x, y = archive["x"], archive["y"]
            groups = archive["group"] if "group" in archive.files else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # empty, truncated, corrupt
        raise DataError(
            f"{spec!r} is not a readable .npz archive without pickled objects ({exc or type(exc).__name__}); "
            "save it with numpy.savez"
        ) from None
    after = path.stat()
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise DataError(f"{spec!r} changed while it was being read; run again once nothing writes to it")
    return x, y, groups, digest


def _checked_images(x: np.ndarray, y: np.ndarray, spec: str) -> np.ndarray:
    """``x`` as (N, C, H, W) once ``x`` and ``y`` pass every check (dtype, rank, length, channels, labels)."""
    for name, arr in (("x", x), ("y", y)):
        if np.iscomplexobj(arr):
            raise DataError(f"{name} in {spec!r} has complex dtype {arr.dtype}; only real numbers are accepted")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"x in {spec!r} has shape {x.shape}; expected (N, H, W) or (N, C, H, W)")
    if y.ndim != 1:
        raise DataError(f"y in {spec!r} has shape {y.shape}; expected (N,) labels")
    if len(x) != len(y):
        raise DataError(f"x and y in {spec!r} differ in length ({len(x)} vs {len(y)}); give one label per image")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"x in {spec!r} has dtype {x.dtype}; images must be real numbers (integer or float)")
    if x.size == 0:
        raise DataError(f"x in {spec!r} is empty (shape {x.shape}); supply at least a few labelled images")
    if x.shape[1] not in (1, 3):
        raise DataError(f"x in {spec!r} has {x.shape[1]} channels; expected 1 (grey) or 3 (RGB) in (N, C, H, W) order")
    _check_labels(y, spec)
    return x


def _check_groups(groups: np.ndarray, n: int, spec: str) -> np.ndarray:
    """The optional ``group`` array as (N,) str labels; refuse a wrong shape, a complex dtype or too many groups."""
    if groups.ndim != 1 or len(groups) != n:
        raise DataError(f"group in {spec!r} has shape {groups.shape}; expected ({n},): one group label per image")
    if np.iscomplexobj(groups):
        raise DataError(f"group in {spec!r} has complex dtype {groups.dtype}; use integer or string group labels")
    labels = np.asarray(groups).astype(str)
    k = len(np.unique(labels))
    if k > MAX_GROUPS:
        raise DataError(
            f"group in {spec!r} has {k} distinct values; per-group metrics compare at most {MAX_GROUPS} groups "
            "(an identifier per image is not a group): merge groups or leave the array out"
        )
    return labels


def decode_image(data: bytes, *, name: str) -> np.ndarray:
    """Decode one image file's bytes to a (C, H, W) float64 array: grey modes to 1 channel, the rest to RGB.

    Raises
    ------
    DataError
        If the bytes are not a readable image (corrupt, truncated, a decompression bomb); the message names the file.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB"), dtype=np.float64)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"image {name!r} cannot be read ({exc}); remove it or re-save it as PNG") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)


def _check_labels(y: np.ndarray, spec: str) -> None:
    """Refuse labels that are not classes: booleans are fine, strings and integers too, floats only when whole."""
    if y.dtype.kind in "biuUS":
        return
    if y.dtype.kind != "f":
        raise DataError(f"y in {spec!r} has dtype {y.dtype}; give integer or string class labels")
    missing = ~np.isfinite(y)
    if missing.any():  # np.unique would make "nan" a class of its own
        raise DataError(
            f"y in {spec!r} has {int(missing.sum())} NaN/inf label(s) (first: row {int(np.flatnonzero(missing)[0])}); "
            "every image needs a class label: label those images or remove them"
        )
    fractional = y[y != np.round(y)]
    if fractional.size:
        raise DataError(
            f"labels look continuous: y in {spec!r} has {fractional.size} non-integer value(s) (e.g. {fractional[0]:g}) "
            f"among {np.unique(y).size} distinct values; the CNN is a classifier, give integer or string class labels"
        )


def _load_image_folder(root: Path) -> RawImages:
    # Hidden folders (.ipynb_checkpoints, .git, .DS_Store's kin) are tool droppings, never classes.
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"image folder {str(root)!r} has no class sub-folders; put each class's images in root/<class>/"
        )
    listing = {
        d: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()) for d in class_dirs
    }
    empty = [d.name for d, files in listing.items() if not files]
    if empty and len(empty) < len(class_dirs):
        raise DataError(
            f"class folder(s) {', '.join(map(repr, empty))} of {str(root)!r} hold no {'/'.join(IMAGE_SUFFIXES)} "
            "images; add images to them or remove them (a class with no images cannot be learnt or tested)"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    digest = hashlib.sha256()
    for label, class_dir in enumerate(class_dirs):
        for file in listing[class_dir]:
            data = file.read_bytes()
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + data)
            arr = decode_image(data, name=str(file))
            if images and arr.shape[0] != images[0].shape[0]:
                kinds = {1: "grey", 3: "RGB"}
                raise DataError(
                    f"image {str(file)!r} is {kinds[arr.shape[0]]}, others are {kinds[images[0].shape[0]]}; "
                    "convert all images to one colour mode (all grey or all RGB)"
                )
            if images and arr.shape != images[0].shape:
                raise DataError(
                    f"image {str(file)!r} has shape {arr.shape}, others {images[0].shape}; resize all images to one size"
                )
            images.append(arr)
            labels.append(label)
    if not images:
        raise DataError(f"image folder {str(root)!r} holds no {'/'.join(IMAGE_SUFFIXES)} files in its class folders")
    x = np.stack(images)
    return RawImages(
        x=x,
        y=np.asarray(labels, dtype=np.int64),
        class_names=tuple(p.name for p in class_dirs),
        provenance={"source": str(root), "sha256": digest.hexdigest(), "rows": len(labels), "shape": list(x.shape[1:])},
    )
