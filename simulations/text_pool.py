"""Real English text for the semi-synthetic benchmark, shipped by installed packages (no download).

Two registers:
  * chatterbot-corpus YAML dialogues (21 English topic files): short chatty prompts and replies;
  * Python's own reference text (`pydoc_data.topics`): technical prose, cut into 1-3 sentence paragraphs.

A pool holds *exchanges*: a prompt with a fixed list of candidate responses (the corpus's own reply, a reply from
the same topic, a reply from another topic, a technical paragraph). Fixing the candidates per prompt lets many users
judge the same responses (as a preference benchmark should) and keeps the embedding cache small.
Everything is deterministic for a seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CANDIDATES_PER_EXCHANGE = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


class TextPoolError(ValueError):
    """The packaged text could not be found or is too small for the requested pool."""


@dataclass(frozen=True)
class Exchange:
    """A user prompt and its candidate responses; `candidates[0]` is the corpus's own reply."""

    category: str
    prompt: str
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class TextPool:
    openers: tuple[Exchange, ...]  # first turns, all categories
    follow_ups: dict[str, tuple[Exchange, ...]]  # later turns, by category of the opener
    remarks: tuple[str, ...]  # statements (no questions) for free-text survey and feedback fields

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(sorted(self.follow_ups))


def chatterbot_dialogues(language: str = "english") -> dict[str, list[list[str]]]:
    """Dialogues per topic file: {category: [[utterance, reply, ...], ...]}, in file order."""
    import yaml

    directory = _chatterbot_dir() / language
    if not directory.is_dir():
        raise TextPoolError(f"chatterbot-corpus has no language {language!r} (looked in {directory})")
    dialogues: dict[str, list[list[str]]] = {}
    for path in sorted(directory.glob("*.yml")):
        with path.open(encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        convs = [[_clean(u) for u in conv] for conv in data.get("conversations") or [] if isinstance(conv, list)]
        convs = [conv for conv in convs if len(conv) >= 2 and all(conv)]
        if convs:
            dialogues[path.stem] = convs
    if not dialogues:
        raise TextPoolError(f"no dialogues found in {directory}")
    return dialogues


def docstring_paragraphs(min_chars: int = 60, max_chars: int = 420) -> list[str]:
    """Prose paragraphs of Python's reference text (`pydoc_data.topics`), code and headings removed, each cut to
    whole sentences of at most `max_chars` characters."""
    from pydoc_data.topics import topics

    out: list[str] = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.split("\n")
            if any(line.startswith(" ") for line in lines):  # indented = code, grammar or quoted output
                continue
            text = _clean(" ".join(lines))
            if any(mark in text for mark in ("***", "::=", ">>>", "===", "---")) or not text.endswith("."):
                continue
            kept = ""
            for sentence in _SENTENCE_END.split(text):
                if len(kept) + len(sentence) + 1 > max_chars:
                    break
                kept = f"{kept} {sentence}".strip()
            if len(kept) >= min_chars:
                out.append(kept)
    return out


def build_text_pool(
    seed: int = 0, *, openers_per_category: int = 25, follow_ups_per_category: int = 12
) -> TextPool:
    """Sample a pool of exchanges: up to `openers_per_category` openers and `follow_ups_per_category` follow-up
    prompts per chatterbot topic, each with CANDIDATES_PER_EXCHANGE distinct candidate responses."""
    if openers_per_category < 1 or follow_ups_per_category < 1:
        raise TextPoolError(
            f"need >= 1 opener and follow-up per category, got {openers_per_category}, {follow_ups_per_category}"
        )
    rng = np.random.default_rng([seed, 7])
    dialogues = chatterbot_dialogues()
    paragraphs = docstring_paragraphs()
    # Adjacent (prompt, reply) pairs per topic, first reply per distinct prompt.
    exchanges: dict[str, list[tuple[str, str]]] = {}
    for category, convs in dialogues.items():
        seen: dict[str, str] = {}
        for conv in convs:
            for i in range(0, len(conv) - 1, 2):
                seen.setdefault(conv[i], conv[i + 1])
        exchanges[category] = list(seen.items())
    replies = {c: sorted({r for _, r in ex}) for c, ex in exchanges.items()}
    categories = sorted(c for c in exchanges if len(replies[c]) >= 2)

    def candidates(category: str, prompt: str, own: str) -> tuple[str, ...]:
        same = [r for r in replies[category] if r != own]
        other_cat = categories[(categories.index(category) + 1 + rng.integers(len(categories) - 1)) % len(categories)]
        other = [r for r in replies[other_cat] if r not in (own,)]
        picks = [own, same[rng.integers(len(same))], other[rng.integers(len(other))]]
        while len(picks) < CANDIDATES_PER_EXCHANGE:
            paragraph = paragraphs[rng.integers(len(paragraphs))]
            if paragraph not in picks:
                picks.append(paragraph)
        return tuple(picks)

    openers: list[Exchange] = []
    follow_ups: dict[str, tuple[Exchange, ...]] = {}
    for category in categories:
        order = rng.permutation(len(exchanges[category]))
        items = [exchanges[category][i] for i in order]
        n_open = min(openers_per_category, max(1, len(items) // 2))
        opener_items = items[:n_open]
        # Small topics reuse their openers as follow-ups rather than dropping out.
        follow_items = items[n_open : n_open + follow_ups_per_category] or items[:follow_ups_per_category]
        openers += [Exchange(category, p, candidates(category, p, r)) for p, r in opener_items]
        follow_ups[category] = tuple(Exchange(category, p, candidates(category, p, r)) for p, r in follow_items)
    all_utterances = sorted(
        {u for convs in dialogues.values() for conv in convs for u in conv if len(u) >= 20 and not u.endswith("?")}
    )
    remarks = tuple(all_utterances[i] for i in rng.permutation(len(all_utterances))[:400])
    return TextPool(openers=tuple(openers), follow_ups=follow_ups, remarks=remarks)


def _chatterbot_dir() -> Path:
    try:
        import chatterbot_corpus
    except ModuleNotFoundError as exc:
        raise TextPoolError("the benchmark needs `chatterbot-corpus` (pip install chatterbot-corpus)") from exc
    return Path(chatterbot_corpus.__file__).resolve().parent / "data"


def _clean(text: object) -> str:
    return " ".join(str(text).split())
