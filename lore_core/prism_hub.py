"""Resolve where the PRISM files come from: a local directory as is, or a Hugging Face dataset name fetched once
into the hub cache (e.g. `HannahRoseKirk/prism-alignment`)."""

from __future__ import annotations

from pathlib import Path

from lore_core.prism_schema import CONVERSATIONS_FILE, SURVEY_FILE, UTTERANCES_FILE

PRISM_HUB_NAME = "HannahRoseKirk/prism-alignment"
HUB_FILES = (SURVEY_FILE, CONVERSATIONS_FILE, UTTERANCES_FILE)


class PrismSourceError(ValueError):
    """A source that is neither a local PRISM directory nor a dataset that could be fetched."""


def resolve_source(source: str | Path) -> Path:
    """Return a local directory holding the PRISM files; download them from the hub if `source` is not a directory."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise PrismSourceError(f"{source} is a file; pass the directory holding {SURVEY_FILE} and {CONVERSATIONS_FILE}")
    name = str(source)
    if name.count("/") != 1 or name.startswith((".", "/")) or name.endswith("/"):
        raise PrismSourceError(f"{source} is not a directory and not a hub dataset name like {PRISM_HUB_NAME}")
    from huggingface_hub import hf_hub_download  # lazily: only a hub source needs it

    try:
        local = [hf_hub_download(name, filename, repo_type="dataset") for filename in HUB_FILES]
    except Exception as exc:  # offline, unknown repo, network or auth failure: all mean "could not fetch"
        raise PrismSourceError(
            f"{source} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}). Without network access, download {', '.join(HUB_FILES)} from "
            f"huggingface.co/datasets/{PRISM_HUB_NAME} elsewhere and pass their local directory."
        ) from exc
    # hf_hub_download puts every file of one revision in the same snapshot folder.
    return Path(local[0]).parent
