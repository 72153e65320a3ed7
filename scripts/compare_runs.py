"""Compare two run directories: are the released models byte-identical and every number in report.json equal?

Used to show that a change which should not change behaviour (a move, a rename, a refactor) did not::

    python scripts/compare_runs.py runs/<before> runs/<after>

    python scripts/compare_runs.py runs/<before> runs/<after> --rename core.=auditml_core.

Weights and graphs (``models/*.safetensors``, ``*.onnx``) must be byte-identical; the training records
(``models/*.json``) and report.json must agree on every number and string, except what two runs never share:
wall-clock timings (keys ending in ``seconds`` / ``_ms`` / ``_s``, latencies, "N s" inside sentences), the run's
identity (id, creation time, git state) and the hashes of files that contain timings (the manifest and artifact
list). Those are counted and printed as ignored, so nothing is skipped silently. ``--rename OLD=NEW`` maps a
string that a behaviour-preserving rename changed (module paths in records). Exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from pathlib import Path

# Keys whose values differ between any two runs: timings, the run's identity, hashes of files holding timings.
_RUN_SPECIFIC = re.compile(
    r"(^|\.)(\w*seconds\w*|\w+_ms|\w+_s|latency)(\.|\[|$)"
    r"|(generated|git_commit|manifest_sha256|reproducibility\.artifacts\[\d+\]\.\w+|_source\.sha256|run_id|created)$"
)
_SECONDS_IN_TEXT = re.compile(r"\d+(\.\d+)? s\b")


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{prefix}[{i}]")
    else:
        yield prefix, node


def _same_number(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _compare_trees(name: str, a_tree, b_tree, renames: list[tuple[str, str]]) -> tuple[list[str], int, int]:
    problems, compared, ignored = [], 0, 0
    ra, rb = dict(_leaves(a_tree)), dict(_leaves(b_tree))
    for key in sorted(set(ra) | set(rb)):
        if key not in ra or key not in rb:
            problems.append(f"{name} {key}: only in {'after' if key in rb else 'before'}")
            continue
        a, b = ra[key], rb[key]
        compared += 1
        if isinstance(a, str) and isinstance(b, str):
            for old, new in renames:
                a = a.replace(old, new)
            a, b = _SECONDS_IN_TEXT.sub("<t> s", a), _SECONDS_IN_TEXT.sub("<t> s", b)
        if _same_number(a, b):
            continue
        if _RUN_SPECIFIC.search(key):
            ignored += 1
            continue
        problems.append(f"{name} {key}: {str(a)[:80]!r} != {str(b)[:80]!r}")
    return problems, compared, ignored


def compare(before: Path, after: Path, renames: list[tuple[str, str]] = ()) -> list[str]:
    """Every difference between two run directories' models, training records and report.json."""
    problems = []
    files = sorted(p.relative_to(before) for p in (before / "models").rglob("*") if p.is_file())
    if not files:
        problems.append(f"{before}/models holds no file: nothing to compare")
    extra = sorted({p.relative_to(after) for p in (after / "models").rglob("*") if p.is_file()} - set(files))
    problems += [f"{rel}: only in {after}" for rel in extra]
    trees = [("report.json", Path("report.json"))]
    binaries = 0
    for rel in files:
        if not (after / rel).exists():
            problems.append(f"{rel}: missing in {after}")
        elif rel.suffix == ".json":
            trees.append((str(rel), rel))
        else:
            binaries += 1
            if (
                hashlib.sha256((before / rel).read_bytes()).digest()
                != hashlib.sha256((after / rel).read_bytes()).digest()
            ):
                problems.append(f"{rel}: bytes differ")
    compared = ignored = 0
    for name, rel in trees:
        found, n, skipped = _compare_trees(
            name, json.loads((before / rel).read_text()), json.loads((after / rel).read_text()), list(renames)
        )
        problems += found
        compared += n
        ignored += skipped
    print(
        f"{binaries} weight/graph files compared byte for byte; {compared} values in {len(trees)} JSON files "
        f"compared; {ignored} run-specific values (timings, run identity, hashes of files holding timings) ignored"
    )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW", help="a string a rename changed")
    args = parser.parse_args(argv)
    renames = [tuple(r.split("=", 1)) for r in args.rename]
    problems = compare(args.before, args.after, renames)
    for line in problems:
        print(line)
    print("identical" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
