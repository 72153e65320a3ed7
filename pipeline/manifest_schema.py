"""The JSON Schema of ``manifest.json``, checked on every read: a manifest is untrusted input.

Whoever can write the run directory can rewrite its manifest; a wrong type or shape in it must
become one line ("this run directory is damaged: ... (at stages/report/seed: 'x' is not of type
'integer')"), never a KeyError or TypeError deep inside a command. The schema types every key the
code reads; other keys are allowed (newer writers may add some), and entries are checked as far as
the code relies on them.
"""

from __future__ import annotations

from typing import Any

SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
TEXT = {"type": "string"}
COUNT = {"type": "integer", "minimum": 0}
NUMBER = {"type": "number"}

STAGE_STATUS = ("pending", "running", "complete", "failed", "stale")

STAGE_ENTRY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "status": {"enum": list(STAGE_STATUS)},
        "seed": {"type": "integer"},
        "attempt": {"type": "integer", "minimum": 1},
        "started": TEXT,
        "seconds": NUMBER,
        "artifacts": {"type": "array", "items": TEXT},
        "error": TEXT,
        "device": {"type": "object"},
    },
}

ARTIFACT_ENTRY: dict[str, Any] = {
    "type": "object",
    "required": ["sha256", "stage"],
    "properties": {
        "sha256": SHA256,
        "previous_sha256": SHA256,
        "bytes": COUNT,
        "stage": TEXT,
        "seed": {"type": ["integer", "null"]},
        "kind": TEXT,  # output, checkpoint or ledger (rundir.py); an unknown kind is treated as output
        "accountant_history": {
            "type": "array",
            "items": {"type": "array", "prefixItems": [NUMBER, NUMBER, COUNT], "minItems": 3, "maxItems": 3},
        },
    },
}

# What this invocation's MLflow logging did (pipeline/tracking.py): off, skipped (run not complete), logged, failed.
TRACKING: dict[str, Any] = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"enum": ["off", "skipped", "logged", "failed"]},
        "reason": TEXT,
        "uri": TEXT,
        "experiment": TEXT,
        "experiment_id": TEXT,
        "mlflow_run_id": TEXT,
        "mlflow_version": TEXT,
        "models": {"type": "object", "additionalProperties": TEXT},
        "registered": {"type": "object", "additionalProperties": TEXT},
    },
}

INVOCATION: dict[str, Any] = {
    "type": "object",
    "properties": {
        "stages": {"type": "array", "items": TEXT},
        "wall_seconds": NUMBER,
        "peak_rss_mb": NUMBER,
        "peak_tree_rss_mb": NUMBER,
        "device": TEXT,
        "tracking": TRACKING,
    },
}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "manifest.json of a run directory",
    "type": "object",
    "required": ["config", "stages", "artifacts"],
    "properties": {
        "format": {"type": "integer"},
        "run_id": TEXT,
        "created": TEXT,
        "command": {"type": "array", "items": TEXT},
        "python_executable": TEXT,
        "platform": TEXT,
        "git_commit": {"type": ["string", "null"]},
        "library_versions": {"type": "object", "additionalProperties": TEXT},
        "device": TEXT,
        "config": {"type": "object", "required": ["sha256"], "properties": {"path": TEXT, "sha256": SHA256}},
        "stages": {"type": "object", "additionalProperties": STAGE_ENTRY},
        "artifacts": {"type": "object", "additionalProperties": ARTIFACT_ENTRY},
        "invocations": {"type": "array", "items": INVOCATION},
    },
}


def manifest_problem(manifest: Any) -> str | None:
    """None when ``manifest`` follows :data:`MANIFEST_SCHEMA`, else the first violation in one line.

    The first violation is the one at the shortest path (then alphabetical), so the message names
    the outermost thing that is wrong.
    """
    import jsonschema  # lazy: ~0.1 s, only commands that open a run directory pay it

    validator = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)
    errors = sorted(
        validator.iter_errors(manifest), key=lambda e: (len(e.absolute_path), [str(p) for p in e.absolute_path])
    )
    if not errors:
        return None
    first = errors[0]
    where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
    message = first.message if len(first.message) <= 160 else first.message[:157] + "..."
    more = f"; {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    return f"at {where}: {message}{more}"
