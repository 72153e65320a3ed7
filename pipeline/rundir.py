"""The run directory: atomic writes, a manifest of every artifact, per-stage status, verification.

Layout::

    runs/<UTC timestamp>-<id>/
        config.toml        resolved configuration
        manifest.json      artifacts (path, sha256, bytes, stage, seed), stage status, versions, device, git commit
        data/ models/ metrics/ checkpoints/ ...   stage outputs

A stage is marked ``complete`` only after every one of its files is on disk and
hashed; a killed run therefore never looks finished, and ``--from`` resumes it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import platform
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from core.artifacts import atomic_write, json_bytes, read_json
from core.errors import RunDirError

MANIFEST = "manifest.json"
CONFIG = "config.toml"
LIBRARIES = ("numpy", "scikit-learn", "torch", "opacus", "flwr", "shap", "lime", "safetensors", "matplotlib")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose behaviour shapes the results."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str | None:
    """The code's git commit (with ``-dirty`` when the tree has changes), or None outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


class RunDir:
    """One run's directory and its manifest."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, out_root: str | Path, *, config_toml: str, command: list[str], device: str) -> "RunDir":
        """Make ``out_root/<timestamp>-<id>/`` and write the resolved config and a first manifest."""
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = Path(out_root) / f"{stamp}-{secrets.token_hex(3)}"
        path.mkdir(parents=True, exist_ok=False)
        atomic_write(path / CONFIG, config_toml.encode("utf-8"))
        manifest = {
            "format": 1,
            "run_id": path.name,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "python_executable": sys.executable,
            "platform": platform.platform(),
            "git_commit": git_commit(),
            "library_versions": library_versions(),
            "device": device,
            "config": {"path": CONFIG, "sha256": sha256_file(path / CONFIG)},
            "stages": {},
            "artifacts": {},
        }
        run = cls(path, manifest)
        run.save_manifest()
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """Open an existing run directory.

        Raises
        ------
        RunDirError
            If it has no readable manifest.
        """
        p = Path(path)
        try:
            manifest = read_json((p / MANIFEST).read_bytes())
        except FileNotFoundError:
            raise RunDirError(
                f"{str(p)!r} is not a run directory (no {MANIFEST}); pass a directory under runs/"
            ) from None
        except ValueError:
            raise RunDirError(f"{str(p / MANIFEST)!r} is not valid JSON; the run directory is damaged") from None
        for tmp in p.rglob(".*.tmp"):
            tmp.unlink()  # left by a write that a kill interrupted; never referenced by the manifest
        return cls(p, manifest)

    def save_manifest(self) -> None:
        atomic_write(self.path / MANIFEST, json_bytes(self.manifest))

    # ---------------------------------------------------------------- stages
    def stage_status(self, name: str) -> str:
        return self.manifest["stages"].get(name, {}).get("status", "pending")

    def begin_stage(self, name: str, *, seed: int) -> None:
        """Mark ``name`` as running and forget any outputs it (and nothing else) had before."""
        previous = self.manifest["stages"].get(name, {})
        self.manifest["stages"][name] = {
            "status": "running",
            "seed": seed,
            "attempt": int(previous.get("attempt", 0)) + 1,
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        self.save_manifest()

    def invalidate(self, name: str) -> None:
        """Drop a stage's record and artifacts (a later stage whose inputs are being recomputed)."""
        for rel in [r for r, a in self.manifest["artifacts"].items() if a["stage"] == name]:
            (self.path / rel).unlink(missing_ok=True)
            del self.manifest["artifacts"][rel]
        if name in self.manifest["stages"]:
            self.manifest["stages"][name]["status"] = "stale"
        self.save_manifest()

    def write(self, rel: str, data: bytes, *, stage: str, seed: int | None, kind: str = "output") -> None:
        """Atomically write one artifact and record its hash in the manifest (saved by the caller)."""
        target = self._inside(rel)
        atomic_write(target, data)
        self.manifest["artifacts"][rel] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "stage": stage,
            "seed": seed,
            "kind": kind,
        }

    def complete_stage(
        self, name: str, files: Mapping[str, bytes], *, seed: int, seconds: float, summary: Any = None
    ) -> None:
        """Write all of a stage's files, then (only then) mark it complete."""
        for rel, data in files.items():
            self.write(rel, data, stage=name, seed=seed)
        entry = self.manifest["stages"][name]
        entry.update({"status": "complete", "seconds": round(seconds, 3), "artifacts": sorted(files)})
        if summary is not None:
            entry["summary"] = summary
        self.save_manifest()

    def fail_stage(self, name: str, error: str) -> None:
        self.manifest["stages"].setdefault(name, {}).update({"status": "failed", "error": error})
        self.save_manifest()

    # ---------------------------------------------------------------- reading
    def _inside(self, rel: str) -> Path:
        target = (self.path / rel).resolve()
        if self.path.resolve() not in target.parents:
            raise RunDirError(f"artifact path {rel!r} leaves the run directory")
        return target

    def read(self, rel: str) -> bytes:
        """Read a recorded artifact, checking it still has the hash the manifest recorded.

        Raises
        ------
        RunDirError
            If it is not recorded, missing, or was modified since it was written.
        """
        entry = self.manifest["artifacts"].get(rel)
        if entry is None:
            raise RunDirError(
                f"{rel!r} is not recorded in {self.path / MANIFEST}; re-run the stage that writes it (--from)"
            )
        try:
            data = self._inside(rel).read_bytes()
        except FileNotFoundError:
            raise RunDirError(
                f"{rel!r} is missing from {self.path}; re-run the stage {entry['stage']!r} with --from {entry['stage']}"
            ) from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise RunDirError(
                f"{rel!r} in {self.path} was modified after it was written (SHA-256 differs); re-run --from {entry['stage']}"
            )
        return data

    def verify(self) -> list[str]:
        """Re-hash every artifact; return one line per problem (edited, missing or extra file)."""
        problems = []
        recorded = dict(self.manifest["artifacts"])
        recorded[CONFIG] = {"sha256": self.manifest["config"]["sha256"]}
        for rel, entry in sorted(recorded.items()):
            p = self.path / rel
            if not p.is_file():
                problems.append(f"missing: {rel}")
            elif sha256_file(p) != entry["sha256"]:
                problems.append(f"edited: {rel} (SHA-256 differs from the manifest)")
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if p.is_file() and rel != MANIFEST and rel not in recorded:
                problems.append(f"extra: {rel} (not in the manifest)")
        return problems
