"""Command line: ``python -m gpu_matrix {probe,table,doc}``.

- ``probe [--json]``: the environment probe (`gpu_matrix.probe`); exits 0 for a supported
  torch/triton pair, 1 for an unsupported one, 3 when torch or triton is missing or broken.
- ``table``: the supported pairs as a markdown table.
- ``doc [--write | --check] [--path FILE]``: regenerate (or check) the table inside
  docs/gpu_matrix.md from ``matrix.toml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import markdown_table, sync_doc
from .probe import main as probe_main

#: docs/gpu_matrix.md in a source checkout (the package sits at the repository root).
DEFAULT_DOC = Path(__file__).resolve().parent.parent / "docs" / "gpu_matrix.md"


def _doc(path: Path, write: bool, check: bool) -> int:
    current = path.read_text(encoding="utf-8")
    wanted = sync_doc(current)
    if write:
        if wanted != current:
            path.write_text(wanted, encoding="utf-8")
        print(f"{path}: table {'updated' if wanted != current else 'already up to date'}")
        return 0
    if check and wanted != current:
        print(f"{path} is out of date with matrix.toml: run python -m gpu_matrix doc --write")
        return 1
    sys.stdout.write(wanted)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run one subcommand; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m gpu_matrix", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="print this machine's torch/triton/GPU/backends/routing")
    probe.add_argument("--json", action="store_true", help="print the probe as JSON")
    sub.add_parser("table", help="print the supported torch<->triton pairs (markdown)")
    doc = sub.add_parser("doc", help="regenerate the table in docs/gpu_matrix.md")
    mode = doc.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the file in place")
    mode.add_argument("--check", action="store_true", help="exit 1 when the file is stale")
    doc.add_argument("--path", type=Path, default=DEFAULT_DOC, help="the document to update")
    args = parser.parse_args(argv)

    if args.command == "probe":
        return probe_main(as_json=args.json)
    if args.command == "table":
        sys.stdout.write(markdown_table())
        return 0
    return _doc(args.path, args.write, args.check)


if __name__ == "__main__":
    sys.exit(main())
