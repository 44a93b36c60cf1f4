"""A benchmark's outputs: its table as FILE.md and its figures as FILE.json beside it, each written atomically."""

from __future__ import annotations

from pathlib import Path

from lore_core.atomic_io import atomic_write_json, atomic_write_text


def write_outputs(out: Path, text: str, figures) -> None:
    """The figures first, then the table that quotes them; the table is printed too."""
    atomic_write_json(Path(out).with_suffix(".json"), figures)
    atomic_write_text(out, text)
    print(text)
