"""Byte encodings of the artifacts stages hand to the runner (JSON, .npz arrays, safetensors weights) and atomic writes.

None of them unpickles anything on the way back in.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import numpy as np


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy values made plain and non-finite floats as None (JSON-safe)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf; null says "not available"
    return obj


def json_bytes(obj: Any) -> bytes:
    """Encode ``obj`` as pretty, key-sorted UTF-8 JSON (numpy values converted, NaN -> null)."""
    return (json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def read_json(data: bytes) -> Any:
    """Decode :func:`json_bytes` output."""
    return json.loads(data.decode("utf-8"))


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Encode named arrays as an uncompressed .npz archive."""
    buf = io.BytesIO()
    named: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}  # Any: the stub types **kw as allow_pickle
    np.savez(buf, **named)
    return buf.getvalue()


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    """Decode :func:`npz_bytes` output without allowing pickled objects."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def state_dict_bytes(state_dict: Mapping[str, Any], *, metadata: Mapping[str, str] | None = None) -> bytes:
    """Encode a torch state dict as safetensors (tensors only, no code)."""
    import torch
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("_module.") for k in clean):
        raise ValueError(
            "state dict still carries Opacus' '_module.' prefix; unwrap it with auditml_core.privacy.dp_sgd.unwrap_state_dict"
        )
    return save(clean, metadata=dict(metadata or {}))


def read_state_dict(data: bytes) -> dict[str, Any]:
    """Decode :func:`state_dict_bytes` output into CPU tensors."""
    from safetensors.torch import load

    return load(data)


@contextlib.contextmanager
def atomic_open(path: Path, *, sync_dir: bool = False) -> Iterator[IO[bytes]]:
    """A binary file handle whose content appears at ``path`` only when the ``with`` block ends without error.

    For outputs too large to hold in memory (streamed predictions): written to a temporary file in
    the same folder, fsynced, then moved into place with ``os.replace``; on any error the temporary
    file is removed and ``path`` is left as it was. ``sync_dir``: also fsync the folder, so that the
    rename itself survives a power cut (write-ahead records: a privacy ledger's reservation).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a failed write() names no file; say which one (disk_full's message)
        raise
    if sync_dir:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file).

    ``sync_dir``: also fsync the folder once the file is in place (see :func:`atomic_open`).
    """
    with atomic_open(path, sync_dir=sync_dir) as fh:
        fh.write(data)


def disk_full(exc: BaseException) -> str | None:
    """For an ``OSError`` ENOSPC (disk full): "no space left on the file system at MOUNT while writing FILE"; else None.

    The edges (the runner, predict, the CLI) turn it into a one-line :class:`~auditml_core.errors.DiskFullError`.
    """
    if not isinstance(exc, OSError) or exc.errno != errno.ENOSPC:
        return None
    name = exc.filename
    if name is None:
        return "no space left on the device while writing"
    target = Path(os.fsdecode(name)).absolute()
    mount = target.parent
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return f"no space left on the file system at {mount} while writing {target}"
