"""What every benchmark does with its result table: print it, and append it to a markdown file."""

from __future__ import annotations

from pathlib import Path


def emit(table: str, write: Path | None) -> None:
    """Print ``table``; with ``write`` (``--write docs/benchmarks.md``) also append it there."""
    print(table)
    if write:
        with write.open("a") as fh:
            fh.write("\n" + table)
