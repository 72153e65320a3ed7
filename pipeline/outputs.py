"""Files a read-only command (``predict``) writes: where they may go, and how several land as one unit.

``predict`` writes its predictions, optionally their SHAP values, and a provenance record that
ties them to the run and carries each file's SHA-256. Written one after the other, a kill between
the writes would leave the previous provenance beside the new predictions: a record that lies.
:class:`OutputSet` stages every file under a temporary name first, then replaces them in an order
where every interruption leaves something true: the old record is removed first, the data files
are moved into place, and the new record, the file that vouches for the others, arrives last.
A reader trusts predictions only when a provenance record names their hash.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Iterable

from auditml_core.errors import ConfigError

MANIFEST = "manifest.json"  # what makes a folder a run directory (pipeline/rundir.py)


def enclosing_run_dir(path: Path) -> Path | None:
    """The run directory (a folder holding ``manifest.json``) that ``path`` lies in, if any."""
    for folder in Path(path).resolve().parents:
        if (folder / MANIFEST).is_file():
            return folder
    return None


def check_output_paths(outputs: Iterable[Path], *, inputs: Iterable[Path]) -> None:
    """Refuse, before any work, output paths that would destroy an input or write into a run directory.

    Parameters
    ----------
    outputs : every file the command will write (the main output and its side files).
    inputs : every file or folder the command reads.

    Raises
    ------
    ConfigError
        An output that is an input (or lies inside an input folder), is a directory, or lies inside a
        run directory (it would overwrite a recorded artifact, or add a file that makes ``verify`` fail).
    """
    sources = [Path(p).resolve() for p in inputs]
    for out in outputs:
        out = Path(out)
        target = out.resolve()
        if out.is_dir():
            raise ConfigError(
                f"--out {str(out)!r} is a directory; give a file path such as {str(out / 'predictions.csv')!r}"
            )
        run = enclosing_run_dir(target)
        if run is not None:
            raise ConfigError(
                f"--out {str(out)!r} lies inside the run directory {str(run)!r}: it would overwrite a recorded artifact "
                "or add a file the manifest does not list (verify then fails); write it outside the run directory"
            )
        for src in sources:
            if target == src or (out.exists() and src.exists() and os.path.samefile(out, src)):
                raise ConfigError(
                    f"--out {str(out)!r} is the input {str(src)!r}: writing it would destroy the data being read; "
                    "choose another output path"
                )
            if src.is_dir() and src in target.parents:
                raise ConfigError(
                    f"--out {str(out)!r} lies inside the input folder {str(src)!r}; choose a path outside it"
                )


class OutputSet:
    """Files staged under temporary names and put in place together by :meth:`commit`.

    Use as a context manager: leaving it without :meth:`commit` (an error) removes every temporary
    file and leaves the final paths as they were.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final)

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, *exc_info: object) -> None:
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged = []

    def open(self, final: Path) -> IO[bytes]:
        """A binary file for ``final``'s content, staged beside it (closed and fsynced by the caller's ``with``)."""
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        self._staged.append((Path(tmp), final))
        return _Synced(os.fdopen(fd, "wb"), filename=str(final))

    def write(self, final: Path, data: bytes) -> None:
        """Stage ``data`` as ``final``'s content."""
        with self.open(final) as fh:
            fh.write(data)

    def staged(self, final: Path) -> Path:
        """The temporary file holding ``final``'s staged content (to hash it before the commit)."""
        return next(tmp for tmp, dest in self._staged if dest == Path(final))

    def commit(self, *, record: Path | None = None, remove: Iterable[Path] = ()) -> None:
        """Put every staged file in place, ``record`` (the file vouching for the others) last.

        First the previous ``record`` and the ``remove`` files (stale side files) are deleted, so no
        old record ever sits beside new data; then the data files replace theirs; then the record.
        """
        for stale in ([Path(record)] if record is not None else []) + [Path(r) for r in remove]:
            stale.unlink(missing_ok=True)
        ordered = sorted(self._staged, key=lambda pair: record is not None and pair[1] == Path(record))
        for tmp, final in ordered:
            os.replace(tmp, final)
        self._staged = []


class _Synced:
    """A file object that fsyncs on close and names its final path in a write error (disk full)."""

    def __init__(self, fh: IO[bytes], *, filename: str):
        self._fh, self._filename = fh, filename

    def write(self, data: bytes) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            exc.filename = exc.filename or self._filename
            raise

    def __enter__(self) -> "_Synced":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if exc_type is None:
                self._fh.flush()
                os.fsync(self._fh.fileno())
        except OSError as exc:
            exc.filename = exc.filename or self._filename
            raise
        finally:
            self._fh.close()
