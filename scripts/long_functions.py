"""List the functions longer than a screen (default 80 lines), with and without their docstrings.

    python scripts/long_functions.py [--max 80]

Counts every function and method in the four packages (auditml_core, federated, pipeline, explain).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("auditml_core", "federated", "pipeline", "explain")


def function_lengths() -> list[tuple[int, int, str]]:
    """(lines, lines without the docstring, "path:line name") for every function."""
    rows = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    total = node.end_lineno - node.lineno + 1
                    doc = node.body[0] if node.body and isinstance(node.body[0], ast.Expr) else None
                    is_doc = (
                        doc is not None and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)
                    )
                    code = total - ((doc.end_lineno - doc.lineno + 1) if is_doc else 0)
                    rows.append((total, code, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=80, help="lines a function may have (default 80)")
    args = parser.parse_args()
    rows = function_lengths()
    long_total = sorted((r for r in rows if r[0] > args.max), reverse=True)
    for total, code, where in long_total:
        print(f"{total:4d} lines ({code:4d} without docstring)  {where}")
    print(
        f"{len(long_total)} of {len(rows)} functions over {args.max} lines; "
        f"{sum(r[1] > args.max for r in rows)} over {args.max} without their docstrings"
    )


if __name__ == "__main__":
    main()
