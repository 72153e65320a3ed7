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
import json
import platform
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from auditml_core.artifacts import atomic_write, json_bytes, read_json
from auditml_core.errors import RunDirError
from auditml_core.privacy import dp_sgd as privacy
from federated.app import checkpoint as fed_checkpoint
from pipeline.manifest_schema import manifest_problem
from pipeline.outputs import OutputSet

MANIFEST = "manifest.json"
CONFIG = "config.toml"
SIGNATURE = "manifest.sig"  # optional Ed25519 signature of manifest.json (python -m pipeline sign)
LIBRARIES = ("numpy", "scikit-learn", "torch", "opacus", "flwr", "shap", "lime", "safetensors", "matplotlib")


LEDGER_DIR = "checkpoints/federated/clients"  # federated clients write their privacy ledgers here themselves
SERVER_CHECKPOINT_DIR = "checkpoints/federated/server"  # the federated server writes its checkpoints here itself
IN_PLACE_SERVER = "federated-server"  # a checkpoint entry's "in_place": written by the ServerApp, noted afterwards


def _ledger_history(data: bytes) -> list[tuple[float, float, int]] | None:
    """The accountant history of a privacy-ledger file's bytes, or None when they are not a ledger."""
    try:
        history = json.loads(data)["accountant_history"]
        return [(float(s), float(q), int(n)) for s, q, n in history]
    except (ValueError, KeyError, TypeError):
        return None


def _accepted(entry: Mapping[str, Any], data: bytes) -> bool:
    """Whether a recorded file's bytes are acceptable: its hash, a checkpoint one write behind, or a ledger ahead.

    A privacy ledger is written by its client before the manifest hears of it (write-ahead), so after a
    kill it may be ahead of its record: accepted when it still covers every step recorded (it can then
    only overstate ε); a ledger that spends less than its record was edited and is refused.
    """
    if hashlib.sha256(data).hexdigest() in _accepted_hashes(entry):
        return True
    if entry.get("in_place") == IN_PLACE_SERVER:  # the server's checkpoint, written since it was noted
        now = fed_checkpoint.summary(data)
        return (
            now is not None
            and now["fingerprint"] == entry.get("fingerprint")
            and now["completed_rounds"] >= int(entry.get("completed_rounds", 0))
        )
    if entry.get("kind") != "ledger" or not isinstance(entry.get("accountant_history"), list):
        return False
    history = _ledger_history(data)
    return history is not None and privacy.covers(history, entry["accountant_history"])


def _accepted_hashes(entry: Mapping[str, Any]) -> set[str]:
    """The hashes a recorded file may have: its own, and for a checkpoint caught mid-replacement the previous one."""
    hashes = {entry["sha256"]}
    if entry.get("kind") == "checkpoint" and isinstance(entry.get("previous_sha256"), str):
        hashes.add(entry["previous_sha256"])
    return hashes


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
        """Open an existing run directory, reading only: nothing in it is written or deleted.

        Read-only commands (verify, predict, serve, report readers) use it as it is; a command that
        will write (a resume) calls :meth:`remove_interrupted_writes` afterwards.

        Raises
        ------
        RunDirError
            If it has no readable manifest, or the manifest breaks its schema (``manifest_schema.py``).
        """
        p = Path(path)
        if not p.is_dir():
            raise RunDirError(f"{str(p)!r} is not a directory; pass a run directory under runs/")
        try:
            manifest = read_json((p / MANIFEST).read_bytes())
        except FileNotFoundError:
            raise RunDirError(
                f"{str(p)!r} is not a run directory (no {MANIFEST}); pass a directory under runs/"
            ) from None
        except (ValueError, OSError) as exc:
            raise damaged(p / MANIFEST, f"not readable JSON: {type(exc).__name__}") from None
        run = cls(p, manifest)
        run._check_manifest()
        return run

    def interrupted_writes(self) -> list[Path]:
        """Temporary files (``.NAME.XXXX.tmp``) that atomic writes leave behind when killed, inside the run.

        Never referenced by the manifest. A live run has one while it writes, so only a command that
        owns the run (a resume) may remove them: :meth:`remove_interrupted_writes`.
        """
        root = self.path.resolve()
        return [
            tmp
            for tmp in sorted(self.path.rglob(".*.tmp"))
            if tmp.is_file() and not tmp.is_symlink() and root in tmp.resolve().parents
        ]

    def remove_interrupted_writes(self) -> None:
        """Delete :meth:`interrupted_writes`; only for a command about to write this run (never a reader)."""
        for tmp in self.interrupted_writes():
            tmp.unlink(missing_ok=True)

    def _check_manifest(self) -> None:
        """Refuse a manifest of the wrong shape or naming a path outside the run (it is untrusted input)."""
        where = self.path / MANIFEST
        problem = manifest_problem(self.manifest)
        if problem is not None:
            raise damaged(where, f"not a valid manifest {problem}")
        for rel in self.manifest["artifacts"]:
            try:
                self._inside(rel)
            except RunDirError:
                raise damaged(where, f"artifact path {rel!r} leaves the run directory") from None

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
        """Drop a stage's record and artifacts (a later stage whose inputs are being recomputed).

        Raises
        ------
        RunDirError
            If any recorded path leaves the run directory (checked for all before anything is deleted).
        """
        doomed = [(rel, self._inside(rel)) for rel, a in self.manifest["artifacts"].items() if a["stage"] == name]
        for rel, target in doomed:
            target.unlink(missing_ok=True)
            del self.manifest["artifacts"][rel]
        if name in self.manifest["stages"]:
            self.manifest["stages"][name]["status"] = "stale"
        self.save_manifest()

    def drop_intermediates(self, name: str) -> None:
        """Drop a stage's checkpoints and ledgers (an explicit re-run starts afresh); its outputs stay.

        The outputs are replaced only when the re-run completes (:meth:`complete_stage`): a re-run
        that fails leaves the run as it was.
        """
        doomed = [
            (rel, self._inside(rel))
            for rel, a in self.manifest["artifacts"].items()
            if a["stage"] == name and a.get("kind") in ("checkpoint", "ledger")
        ]
        for rel, target in doomed:
            target.unlink(missing_ok=True)
            del self.manifest["artifacts"][rel]
        if doomed:
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

    def replace_checkpoint(self, rel: str, data: bytes, *, stage: str, seed: int | None) -> None:
        """Replace a checkpoint so that a kill at any moment leaves the file matching the manifest.

        The manifest is saved first with the new hash and the current one as ``previous_sha256``,
        then the file is replaced atomically: killed in between, the file is the previous version,
        which :meth:`read` and :meth:`verify` still accept (a checkpoint one write behind).
        """
        target = self._inside(rel)
        old = self.manifest["artifacts"].get(rel)
        if old is None or not target.is_file():
            # The first version: file first, then the manifest. Killed in between, the file is merely
            # unrecorded (a resume ignores it and writes it again).
            self.write(rel, data, stage=stage, seed=seed, kind="checkpoint")
            self.save_manifest()
            return
        entry = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "stage": stage, "seed": seed}
        self.manifest["artifacts"][rel] = {**entry, "kind": "checkpoint", "previous_sha256": old["sha256"]}
        self.save_manifest()
        atomic_write(target, data)

    def record_ledger(self, rel: str, *, stage: str, seed: int | None) -> None:
        """Note in the manifest a privacy ledger a federated client wrote in place (no copy: it is the authority).

        The entry keeps the ledger's accountant history, so a later read accepts the file while it covers
        that spend (the client may have reserved more since) and refuses it once it spends less.
        """
        target = self._inside(rel)
        data = target.read_bytes()
        history = _ledger_history(data)
        if history is None:
            raise damaged(target, "not a privacy ledger (no accountant_history)")
        old = self.manifest["artifacts"].get(rel)
        # A client's ledger only grows (a reservation is settled at the same steps: fit runs every planned step).
        if old is not None and not _accepted(old, data):
            raise damaged(target, "the privacy ledger records less spend than the manifest did: it was edited")
        self.manifest["artifacts"][rel] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "stage": stage,
            "seed": seed,
            "kind": "ledger",
            "accountant_history": [list(h) for h in history],
        }
        self.save_manifest()

    def record_server_checkpoint(self, rel: str, *, stage: str, seed: int | None) -> None:
        """Note in the manifest the federated server's checkpoint, which the ServerApp writes in place after every
        round (no copy that could lag a round behind): its hash, completed rounds and run fingerprint.

        A later read accepts the file while it belongs to the same run and has at least the rounds noted
        (the server may have completed more since); an older or another run's checkpoint is refused.
        """
        target = self._inside(rel)
        data = target.read_bytes()
        summary = fed_checkpoint.summary(data)
        if summary is None:
            raise damaged(target, "not a federated server checkpoint")
        old = self.manifest["artifacts"].get(rel)
        if old is not None and not _accepted(old, data):
            raise damaged(target, "the server checkpoint has fewer rounds than the manifest noted, or another run's")
        self.manifest["artifacts"][rel] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "stage": stage,
            "seed": seed,
            "kind": "checkpoint",  # an intermediate: dropped when the stage is re-run afresh
            "in_place": IN_PLACE_SERVER,
            **summary,
        }
        self.save_manifest()

    def complete_stage(
        self,
        name: str,
        files: Mapping[str, bytes],
        *,
        seed: int,
        seconds: float,
        summary: Any = None,
        device: Mapping[str, Any] | None = None,
    ) -> None:
        """Write all of a stage's files, then (only then) mark it complete (``device``: its placement record).

        The new files are first written beside their targets under temporary names: if that fails
        (a full disk, an error), the stage's earlier outputs stay in place and recorded, and nothing
        new appears. Only then do they replace the earlier ones; earlier outputs the new ones do not
        replace are deleted. Killed while they are being moved into place, the stage is still
        ``running`` in the manifest, so a resume runs it again.
        """
        targets = {rel: self._inside(rel) for rel in files}
        previous = {
            rel: self._inside(rel)
            for rel, a in self.manifest["artifacts"].items()
            if a["stage"] == name and a.get("kind", "output") not in ("checkpoint", "ledger") and rel not in files
        }
        with OutputSet() as staged:
            for rel, data in files.items():
                staged.write(targets[rel], data)
            staged.commit()
        for rel, data in files.items():
            self.manifest["artifacts"][rel] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "stage": name,
                "seed": seed,
                "kind": "output",
            }
        for rel, target in previous.items():
            target.unlink(missing_ok=True)
            del self.manifest["artifacts"][rel]
        entry = self.manifest["stages"][name]
        entry.update({"status": "complete", "seconds": round(seconds, 3), "artifacts": sorted(files)})
        if summary is not None:
            entry["summary"] = summary
        if device is not None:
            entry["device"] = dict(device)
        self.save_manifest()

    def fail_stage(self, name: str, error: str) -> None:
        self.manifest["stages"].setdefault(name, {}).update({"status": "failed", "error": error})
        self.save_manifest()

    # ---------------------------------------------------------------- reading
    def _inside(self, rel: str) -> Path:
        """``rel`` resolved inside the run; refuses absolute paths, ``..`` and symlinks that lead out."""
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or "\\" in rel or "\0" in rel:
            raise RunDirError(f"artifact path {rel!r} leaves the run directory (or is not a relative path)")
        target = (self.path / rel).resolve()
        if self.path.resolve() not in target.parents:
            raise RunDirError(f"artifact path {rel!r} leaves the run directory")
        return target

    def read_config(self) -> Path:
        """The run's ``config.toml``, checked against the hash the manifest recorded.

        Raises
        ------
        RunDirError
            If it is missing, leads outside the run (a symlink) or was modified.
        """
        target = self._inside(CONFIG)
        try:
            data = target.read_bytes()
        except OSError as exc:
            raise damaged(self.path / CONFIG, exc.strerror or type(exc).__name__) from None
        if hashlib.sha256(data).hexdigest() != self.manifest["config"]["sha256"]:
            raise damaged(self.path / CONFIG, "SHA-256 differs from the manifest: it was edited")
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
        except OSError as exc:
            raise damaged(self.path / rel, exc.strerror or type(exc).__name__) from None
        if not _accepted(entry, data):
            raise RunDirError(
                f"{rel!r} in {self.path} was modified after it was written (SHA-256 differs); re-run --from {entry['stage']}"
            )
        return data

    def verify(self) -> list[str]:
        """Re-hash every artifact; return one line per problem (edited, missing, outside or extra file).

        Completeness is a separate question: see :meth:`incomplete`. Temporary files of interrupted or
        in-progress writes (:meth:`interrupted_writes`) are not counted here either: they belong to no
        artifact, and a live run has one while it writes.
        """
        problems = []
        recorded = dict(self.manifest["artifacts"])
        recorded[CONFIG] = {"sha256": self.manifest["config"]["sha256"]}
        for rel, entry in sorted(recorded.items()):
            try:
                p = self._inside(rel)
            except RunDirError:
                problems.append(f"outside: {rel} (leaves the run directory; not read)")
                continue
            if not p.is_file():
                problems.append(f"missing: {rel}")
            elif sha256_file(p) not in _accepted_hashes(entry) and not _accepted(entry, p.read_bytes()):
                problems.append(f"edited: {rel} (SHA-256 differs from the manifest)")
        unnoted = set(self.unnoted_ledgers()) | set(self.unnoted_server_checkpoints())
        unnoted |= {p.relative_to(self.path).as_posix() for p in self.interrupted_writes()}  # see cmd_verify
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if p.is_symlink() and rel not in recorded:
                problems.append(f"extra: {rel} (a symbolic link, not in the manifest)")
            elif p.is_file() and rel not in (MANIFEST, SIGNATURE) and rel not in recorded and rel not in unnoted:
                problems.append(f"extra: {rel} (not in the manifest)")
        return problems

    def unnoted_ledgers(self) -> list[str]:
        """Privacy ledgers federated clients wrote here that the manifest has not noted yet (relative paths).

        A client writes its ledger before it trains (write-ahead) and the train stage notes it in the
        manifest afterwards, so a run stopped in between leaves a ledger the manifest does not list. It
        is the client's own record of what it spent, not a stray file: a resume reads and notes it.
        """
        root = self.path / LEDGER_DIR
        if self.stage_status("train") == "complete" or not root.is_dir():
            return []
        recorded = self.manifest["artifacts"]
        out = []
        for p in sorted(root.rglob("*.json")):
            rel = p.relative_to(self.path).as_posix()
            if rel not in recorded and not p.is_symlink() and _ledger_history(p.read_bytes()) is not None:
                out.append(rel)
        return out

    def unnoted_server_checkpoints(self) -> list[str]:
        """Federated server checkpoints the ServerApp wrote here that the manifest has not noted yet: the run
        stopped within moments of its first checkpoint. A resume reads and notes them (relative paths)."""
        root = self.path / SERVER_CHECKPOINT_DIR
        if self.stage_status("train") == "complete" or not root.is_dir():
            return []
        recorded = self.manifest["artifacts"]
        return [
            p.relative_to(self.path).as_posix()
            for p in sorted(root.glob("*.checkpoint.safetensors"))
            if p.relative_to(self.path).as_posix() not in recorded
            and not p.is_symlink()
            and fed_checkpoint.summary(p.read_bytes()) is not None
        ]

    def incomplete(self, stages: list[str]) -> list[str]:
        """One line per stage of ``stages`` (registry order) that is not ``complete``, with its status."""
        out = []
        for name in stages:
            status = self.stage_status(name)
            if status != "complete":
                why = {
                    "running": "killed or still running",
                    "failed": self.manifest["stages"].get(name, {}).get("error", "failed"),
                    "stale": "its inputs were recomputed after it ran",
                    "pending": "never run",
                }.get(status, "unknown status")
                out.append(f"incomplete: stage {name} is {status} ({why})")
        return out

    def manifest_sha256(self) -> str:
        """SHA-256 of ``manifest.json`` as it is on disk: the anchor an auditor records out of band."""
        return sha256_file(self.path / MANIFEST)


def damaged(path: Path, reason: str) -> RunDirError:
    """The one wording of a corrupt run-directory file."""
    return RunDirError(f"this run directory is damaged: {path} ({reason})")
