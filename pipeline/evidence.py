"""The manifest as evidence: its SHA-256 to record out of band, and an optional Ed25519 signature.

``verify`` proves the artifacts match ``manifest.json``; it cannot prove the manifest itself is
the one the run wrote, since whoever edits a file can edit its hash too. Two anchors close that:

- the manifest's SHA-256, printed at the end of every run, which the auditor records elsewhere;
- a detached Ed25519 signature, ``manifest.sig``, made with a key the user holds
  (``python -m pipeline sign RUN_DIR --key PRIVATE.pem``) and checked with the public key
  (``python -m pipeline verify RUN_DIR --key PUBLIC.pem``).

The signature covers the exact bytes of ``manifest.json``; any later change to the run (a re-run
stage, a resumed invocation) rewrites the manifest and the old signature no longer verifies: sign
again after the last invocation.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, Mapping

from auditml_core.artifacts import atomic_write, read_json
from auditml_core.config import load_config
from auditml_core.errors import ConfigError, RunDirError
from pipeline import runner
from pipeline.rundir import CONFIG, MANIFEST, SIGNATURE, RunDir

SIG_PREFIX = b"ed25519 "  # manifest.sig: "ed25519 <base64 signature>\n"


def _load_key(path: str | Path, *, private: bool):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"key file {str(p)!r} cannot be read ({exc.strerror or exc}); pass an Ed25519 PEM key"
        ) from None
    try:
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError) as exc:
        kind = "private" if private else "public"
        raise ConfigError(
            f"key file {str(p)!r} is not an unencrypted PEM {kind} key ({exc}); "
            "make one with `python -m pipeline keygen KEY.pem`"
        ) from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise ConfigError(
            f"key file {str(p)!r} is not an Ed25519 key; make one with `python -m pipeline keygen KEY.pem`"
        )
    return key


def keygen(private_path: str | Path, *, force: bool = False) -> Path:
    """Write a new Ed25519 private key (mode 0600) and its public key next to it (``.pub.pem``); return the latter.

    Raises
    ------
    ConfigError
        If either file exists (unless ``force``: then both are replaced), or the folder is missing or
        not writable; checked before anything is written.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    p = Path(private_path)
    pub = p.with_name(p.name.removesuffix(".pem") + ".pub.pem")
    folder = p.parent
    if not folder.is_dir():
        raise ConfigError(
            f"folder {str(folder)!r} for the key does not exist; create it first or choose a path in an existing folder"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"folder {str(folder)!r} is not writable; choose a path in a folder you can write to")
    existing = [str(f) for f in (p, pub) if f.exists() or f.is_symlink()]
    if existing and not force:
        raise ConfigError(
            f"{' and '.join(map(repr, existing))} already exist{'s' if len(existing) == 1 else ''}; a key is never "
            "overwritten: choose a new path, or pass "
            "--force to replace the pair (signatures made with the old key then no longer verify against it)"
        )
    if any(f.is_dir() for f in (p, pub)):
        raise ConfigError(f"{str(p)!r} or {str(pub)!r} is a directory; choose a file path for the key")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if force:  # atomic replacement; the temporary file is created 0600, so the private key is never readable
        atomic_write(p, pem)
        atomic_write(pub, public)
        os.chmod(pub, 0o644)
        return pub
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    fd = os.open(pub, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # never follows or replaces a file made meanwhile
    with os.fdopen(fd, "wb") as fh:
        fh.write(public)
    return pub


def sign(run: RunDir, private_key: str | Path) -> str:
    """Sign the exact bytes of ``run``'s manifest; write ``manifest.sig``; return the manifest's SHA-256."""
    key = _load_key(private_key, private=True)
    signature = key.sign((run.path / MANIFEST).read_bytes())
    atomic_write(run.path / SIGNATURE, SIG_PREFIX + base64.b64encode(signature) + b"\n")
    return run.manifest_sha256()


def check_signature(run: RunDir, public_key: str | Path) -> str | None:
    """None when ``manifest.sig`` is a valid signature of ``manifest.json`` by ``public_key``, else the problem."""
    from cryptography.exceptions import InvalidSignature

    key = _load_key(public_key, private=False)
    sig_path = run.path / SIGNATURE
    if not sig_path.is_file() or sig_path.is_symlink():
        return f"unsigned: {SIGNATURE} is missing; sign the run with `python -m pipeline sign RUN_DIR --key KEY.pem`"
    raw = sig_path.read_bytes().strip()
    try:
        if not raw.startswith(SIG_PREFIX):
            raise ValueError("no 'ed25519 ' prefix")
        signature = base64.b64decode(raw[len(SIG_PREFIX) :], validate=True)
        key.verify(signature, (run.path / MANIFEST).read_bytes())
    except (ValueError, InvalidSignature):
        return f"signature: {SIGNATURE} does not verify against {MANIFEST} with this public key (edited or re-signed)"
    return None


def rerender(run: RunDir) -> list[str]:
    """Re-render the report from the run's recorded (hash-checked) artifacts; one line per file that differs.

    The report is a pure function of its recorded inputs (``report_provenance.json`` holds the
    manifest it read), so an unmodified run re-renders byte for byte. An empty list means every
    report file was reproduced exactly *and* the run still holds the artifacts the report was built
    from: a file swapped after the report (its hash rewritten in ``manifest.json`` too) leaves the
    re-rendered bytes unchanged, because the report lists the hashes it read, so those hashes are
    compared with the manifest's (:func:`built_from_problems`).

    Raises
    ------
    RunDirError
        If the report stage is not complete or a recorded input is missing, edited or damaged.
    """
    if run.stage_status("report") != "complete":
        raise RunDirError(f"the report of {run.path} is not complete; run the report stage before --rerender")
    stage = runner.STAGES["report"]
    cfg = load_config(run.read_config())
    inputs = {}
    for dep in (*stage.requires, *stage.optional):
        if run.stage_status(dep) == "complete":
            inputs[dep] = runner.load_recorded(dep, run)
    module = runner.stage_module("report")
    inputs[runner.PROVENANCE] = read_json(run.read(module.PROVENANCE_FILE))
    problems = built_from_problems(run, inputs[runner.PROVENANCE])
    seed = int(run.manifest["stages"]["report"]["seed"])
    files = module.dump(module.run(cfg, inputs, seed=seed))
    recorded = sorted(r for r, a in run.manifest["artifacts"].items() if a["stage"] == "report")
    pdf_file = module.pdf.FILE
    if pdf_file in recorded and pdf_file not in files:  # this environment cannot print it; say so, not just "differs"
        why = module.pdf.unavailable() or "WeasyPrint could not render it here (report.json says why)"
        problems.append(
            f"not reproduced: {pdf_file} (cannot be re-rendered here: {why}; {module.pdf.INSTALL_HINT}); "
            "report.html and report.json then differ too, as they say whether the PDF exists"
        )
    problems += [
        f"not reproduced: {rel} (re-rendered bytes differ)" for rel in recorded if files.get(rel) != run.read(rel)
    ]
    problems += [
        f"not recorded: {rel} (re-rendering writes it; the run did not)" for rel in sorted(set(files) - set(recorded))
    ]
    return problems


def built_from_problems(run: RunDir, provenance: Mapping[str, Any]) -> list[str]:
    """One line per artifact whose hash differs from the one the report was built from (``report_provenance.json``).

    Covers the config and every artifact of the stages before the report, both ways: changed, gone from
    the manifest, or recorded now but not when the report was rendered.
    """
    before = dict(provenance.get("artifacts") or {})
    before[CONFIG] = provenance.get("config") or {}
    now = {rel: a for rel, a in run.manifest["artifacts"].items() if a["stage"] != "report"}
    now[CONFIG] = run.manifest["config"]
    problems = []
    for rel in sorted(set(before) | set(now)):
        then, current = (before.get(rel) or {}).get("sha256"), (now.get(rel) or {}).get("sha256")
        if then == current:
            continue
        if current is None:
            problems.append(
                f"not reproduced: {rel} (the report lists it with SHA-256 {then}; the run no longer has it)"
            )
        elif then is None:
            problems.append(f"not reproduced: {rel} (recorded with SHA-256 {current}, but the report does not list it)")
        else:
            problems.append(
                f"not reproduced: {rel} (the report was built from SHA-256 {then}; the run now records {current}: "
                "the file was replaced after the report)"
            )
    return problems
