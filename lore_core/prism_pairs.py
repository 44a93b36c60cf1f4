"""PRISM release -> preference pairs with the LoRe seen/unseen split (`lore-fed prepare`).

Pairs. In every turn the chosen response is paired with each response of that turn that has a strictly lower score
and a different text. The context (`history`) is the conversation up to that turn as chat messages: each earlier
turn's user message and its chosen reply, ending with this turn's user message (a turn nobody chose in contributes
its user message only). Nothing is inferred from ties. Dropped and counted:
  turns_without_chosen          no response marked chosen (the turn yields no pairs)
  turns_both_chosen             identical A/B texts, both marked chosen: there is no rejected response
  pairs_empty_string            chosen or candidate text is the release's "EMPTY STRING"   } per candidate, checked
                                (or empty)                                                  }
  pairs_identical_text          candidate text equals the chosen text                       } in this order; the
  pairs_tied_score              equal scores                                                } first that applies
  pairs_rejected_scored_higher  the unchosen response scored higher than the chosen one     } is counted

Split (the LoRe paper protocol, Bose et al. 2025, PRISM/prepare.py; parameters are options):
  1. rng = np.random.RandomState(split_seed)                                       (default 123)
  2. users = ids of users with at least one conversation, sorted as strings; order = users[rng.permutation(U)]
  3. the first int(seen_fraction * U) users of `order` are "seen", the rest "unseen"       (default 0.8)
  4. a user is kept iff at least `min_conversations` of their conversations have pairs      (default 6; LoRe's "> 5")
  5. for each kept user in `order`: their conversation ids with pairs, sorted as strings, are permuted with
     rng.permutation(n); the first int(train_fraction * n) go to "train", the rest to "test" (default 0.5)
Every pair inherits its conversation's split; an unseen user's "train" pairs are their few-shot pairs.
Differences from LoRe's script: users and conversations are sorted before shuffling (LoRe uses file order), the
pool is users with conversations (LoRe: with a usable turn), and one pair per rejected response (LoRe HEAD puts all
rejected texts of a turn into one list, defect 2 in the note).

Outputs (`prepare_dataset`): pairs.jsonl, users.jsonl (per kept user: seen, n_conversations = conversations with
pairs, pair counts per split, survey demographics kept for privacy audits), summary.json, and ground_truth.npz
copied unchanged when the source has one (benchmark populations).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_bytes, check_output_path
from lore_core.pairs import PAIRS_FILENAME, PAIRS_JSONL
from lore_core.prism_hub import resolve_source
from lore_core.prism_schema import GROUND_TRUTH_FILE, EMPTY_RESPONSE, Conversation, PrismRelease, load_release
from lore_core.text_file import normalisation_twins, twins_message

USERS_JSONL = "users.jsonl"
SUMMARY_JSON = "summary.json"
# Every file a dataset directory holds once prepared and embedded: commands read them, so no output may replace one.
DATASET_FILES = (PAIRS_JSONL, USERS_JSONL, SUMMARY_JSON, GROUND_TRUTH_FILE, PAIRS_FILENAME)

TURN_DROPS = ("turns_without_chosen", "turns_both_chosen")
PAIR_DROPS = ("pairs_empty_string", "pairs_identical_text", "pairs_tied_score", "pairs_rejected_scored_higher")
DEMOGRAPHIC_KEYS = (
    "age", "gender", "education", "employment_status", "marital_status", "english_proficiency", "location",
    "study_locale",
)  # fmt: skip
SIMPLIFIED_KEYS = ("religion", "ethnicity")  # survey objects reduced to their "simplified" category


class PrismPrepareError(ValueError):
    """Options or data that cannot produce a dataset (e.g. no user passes the min-conversations rule)."""


@dataclass(frozen=True)
class SplitConfig:
    min_conversations: int = 6
    split_seed: int = 123
    seen_fraction: float = 0.8
    train_fraction: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.min_conversations, bool) or not isinstance(self.min_conversations, int):
            raise PrismPrepareError(f"--min-conversations must be an integer, got {self.min_conversations!r}")
        if self.min_conversations < 1:
            raise PrismPrepareError(f"--min-conversations must be >= 1, got {self.min_conversations}")
        if not 0 <= self.split_seed < 2**32:
            raise PrismPrepareError(f"--split-seed must be in [0, 2**32), got {self.split_seed}")
        for name in ("seen_fraction", "train_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise PrismPrepareError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")


DEFAULTS = SplitConfig()


@dataclass(frozen=True)
class UserSplit:
    """Result of the split: who is seen, which conversations are train/test, and which users were dropped."""

    seen: dict[str, bool]  # kept user -> seen
    conversation_split: dict[str, str]  # conversation id of a kept user -> "train" | "test"
    seen_pool: int  # users assigned "seen" before the min-conversations rule
    unseen_pool: int
    dropped_users: tuple[str, ...]  # users with conversations removed by the min-conversations rule


def build_pairs(conversations: tuple[Conversation, ...]) -> tuple[list[dict], dict[str, int]]:
    """All (chosen, rejected) pairs in file order, without split fields, and the drop counts (see module doc)."""
    pairs: list[dict] = []
    drops: Counter = Counter({reason: 0 for reason in TURN_DROPS + PAIR_DROPS})
    for conversation in conversations:
        history: list[dict] = []
        for turn in conversation.turns:
            history.append({"role": "user", "content": turn.prompt})
            context = list(history)
            chosen = turn.chosen
            if not chosen:
                drops["turns_without_chosen"] += 1
                continue
            history.append({"role": "assistant", "content": chosen[0].text})
            if len(chosen) > 1:
                drops["turns_both_chosen"] += 1
                continue
            best = chosen[0]
            for other in turn.responses:
                if other is best:
                    continue
                reason = _pair_drop_reason(best.text, best.score, other.text, other.score)
                if reason:
                    drops[reason] += 1
                    continue
                pairs.append(
                    {
                        "user": conversation.user_id,
                        "conversation": conversation.conversation_id,
                        "turn": turn.index,
                        "history": context,
                        "chosen": best.text,
                        "rejected": other.text,
                        "chosen_score": best.score,
                        "rejected_score": other.score,
                    }
                )
    return pairs, dict(drops)


def _pair_drop_reason(chosen: str, chosen_score: int, other: str, other_score: int) -> str | None:
    if EMPTY_RESPONSE in (chosen, other) or "" in (chosen, other):  # `embed` refuses an empty response
        return "pairs_empty_string"
    if chosen == other:
        return "pairs_identical_text"
    if chosen_score == other_score:
        return "pairs_tied_score"
    if other_score > chosen_score:
        return "pairs_rejected_scored_higher"
    return None


def split_users(users: list[str], conversations_with_pairs: dict[str, list[str]], config: SplitConfig) -> UserSplit:
    """The LoRe split (module doc, steps 1-5). `users`: ids with conversations; values: their conversation ids."""
    rng = np.random.RandomState(config.split_seed)
    pool = sorted(users)
    order = [pool[i] for i in rng.permutation(len(pool))]
    n_seen = int(config.seen_fraction * len(order))
    seen: dict[str, bool] = {}
    conversation_split: dict[str, str] = {}
    dropped: list[str] = []
    for position, user in enumerate(order):
        ids = sorted(conversations_with_pairs.get(user, ()))
        if len(ids) < config.min_conversations:
            dropped.append(user)
            continue
        seen[user] = position < n_seen
        shuffled = [ids[i] for i in rng.permutation(len(ids))]
        n_train = int(config.train_fraction * len(ids))
        conversation_split.update({cid: "train" if k < n_train else "test" for k, cid in enumerate(shuffled)})
    return UserSplit(seen, conversation_split, n_seen, len(order) - n_seen, tuple(sorted(dropped)))


def user_demographics(survey_row: dict) -> dict:
    """Demographic fields of one survey row; `location` stays an object, religion/ethnicity become their category."""
    demographics = {key: survey_row[key] for key in DEMOGRAPHIC_KEYS}
    demographics.update({key: survey_row[key].get("simplified") for key in SIMPLIFIED_KEYS})
    return demographics


def prepare_dataset(
    source: str | Path,
    out_dir: str | Path,
    *,
    min_conversations: int = DEFAULTS.min_conversations,
    split_seed: int = DEFAULTS.split_seed,
    seen_fraction: float = DEFAULTS.seen_fraction,
    train_fraction: float = DEFAULTS.train_fraction,
) -> dict:
    """Validate a PRISM release (directory or hub name), build pairs and the split, and write the dataset.

    Everything is validated and built in memory first; a failure leaves `out_dir` absent or as it was.
    Returns the summary that is also written to `summary.json`.
    """
    config = SplitConfig(min_conversations, split_seed, seen_fraction, train_fraction)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PrismPrepareError(f"--out {out_dir} exists and is not a directory")
    check_output_path(out_dir, "--out", directory=True)  # a file on the way or no write access: before the work
    directory = resolve_source(source)
    if out_dir.exists() and out_dir.resolve() == Path(directory).resolve():  # a tester: the release was rewritten
        raise PrismPrepareError(f"--out {out_dir} is the release being prepared ({source}): give another directory")
    release = load_release(directory)
    pairs, drops = build_pairs(release.conversations)

    conversations_with_pairs: dict[str, set[str]] = defaultdict(set)
    for pair in pairs:
        conversations_with_pairs[pair["user"]].add(pair["conversation"])
    users = sorted({c.user_id for c in release.conversations})
    twins = normalisation_twins(np.array(users, dtype=str))
    if twins:
        raise PrismPrepareError(twins_message(directory, "user_id values", twins))
    split = split_users(users, {u: sorted(ids) for u, ids in conversations_with_pairs.items()}, config)
    if not split.seen:
        most = max((len(ids) for ids in conversations_with_pairs.values()), default=0)
        raise PrismPrepareError(
            f"no user has at least {config.min_conversations} conversations with pairs (the most any user has is "
            f"{most}); lower --min-conversations"
        )

    kept = [
        {**pair, "split": split.conversation_split[pair["conversation"]], "seen": split.seen[pair["user"]]}
        for pair in pairs
        if pair["user"] in split.seen
    ]
    files = {PAIRS_JSONL: _jsonl(kept), USERS_JSONL: _jsonl(_user_rows(release, split, kept))}
    ground_truth = directory / GROUND_TRUTH_FILE
    if ground_truth.is_file():
        files[GROUND_TRUTH_FILE] = ground_truth.read_bytes()
    summary = _summary(release, directory, config, split, pairs, kept, drops)
    summary["population_warnings"] = population_warnings(users, split, config)
    if any(split.seen.values()) and not summary["pairs_per_split"]["seen_train"]:
        summary["population_warnings"].append(
            f"no seen user has training pairs (train fraction {config.train_fraction}: each user's first "
            f"int({config.train_fraction} x conversations) conversations are its training part): `lore-fed train` "
            "and `simulate` will refuse this dataset; raise --train-fraction")
    if kept and not any(pair["split"] == "test" for pair in kept):  # a tester's --train-fraction 1: no word
        summary["population_warnings"].append(
            f"no pair is a test pair (train fraction {config.train_fraction}): `train`, `simulate` and `evaluate` "
            "will report training-pair figures only; lower --train-fraction")
    summary["ground_truth_copied"] = GROUND_TRUTH_FILE in files
    files[SUMMARY_JSON] = (json.dumps(summary, indent=2) + "\n").encode()
    _refuse_foreign_files(out_dir, files)
    _write_outputs(out_dir, files)
    return summary


def _refuse_foreign_files(out_dir: Path, files: dict[str, bytes]) -> None:
    """An existing out_dir that is not a dataset of `prepare` (no summary.json of its own) may not hold a file that
    `prepare` would replace or remove: it is the user's own. A file that holds what would be written stays allowed
    (a copy of the source's truth; a write of the same dataset cut short before its summary)."""
    if not out_dir.is_dir() or _is_own_summary(out_dir / SUMMARY_JSON):
        return
    found = []
    for name in (PAIRS_JSONL, USERS_JSONL, SUMMARY_JSON, GROUND_TRUTH_FILE):
        path = out_dir / name
        if path.exists() and not (name in files and path.is_file() and path.read_bytes() == files[name]):
            found.append(name)
    if found:
        raise PrismPrepareError(f"--out {out_dir} is not a dataset of lore-fed prepare (it has no summary.json of "
                                f"prepare's) but holds {', '.join(found)}, which prepare would replace; give a new "
                                "directory, or move those files")


def _is_own_summary(path: Path) -> bool:
    """`path` is a summary.json that `prepare` wrote (it records the split protocol)."""
    try:
        protocol = json.loads(path.read_bytes())["split"]["protocol"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(protocol, str) and protocol.startswith("LoRe PRISM")


def population_warnings(users: list[str], split: UserSplit, config: SplitConfig) -> list[str]:
    """What makes a dataset useless for (federated) training although it is well formed; `prepare` prints these."""
    out = []
    if len(users) == 1:
        out.append(f"all conversations belong to one user ({users[0]!r}): federated LoRe needs many users (is "
                   "user_id filled in per user?)")
    if config.seen_fraction > 0 and not any(split.seen.values()):
        out.append(f"no seen user was kept ({split.seen_pool} of {len(users)} users with conversations drawn as seen, "
                   f"seen fraction {config.seen_fraction}): nothing to train on; `lore-fed train` and `simulate` "
                   "will refuse this dataset")
    return out


def _user_rows(release: PrismRelease, split: UserSplit, kept: list[dict]) -> list[dict]:
    counts = Counter((pair["user"], pair["split"]) for pair in kept)
    n_conversations = Counter(pair_user for pair_user, _ in {(p["user"], p["conversation"]) for p in kept})
    return [
        {
            "user": user,
            "seen": split.seen[user],
            "n_conversations": n_conversations[user],
            "n_train_pairs": counts[(user, "train")],
            "n_test_pairs": counts[(user, "test")],
            "demographics": user_demographics(release.survey[user]),
        }
        for user in sorted(split.seen)
    ]


def _summary(
    release: PrismRelease,
    directory: Path,
    config: SplitConfig,
    split: UserSplit,
    pairs: list[dict],
    kept: list[dict],
    drops: dict[str, int],
) -> dict:
    with_conversations = {c.user_id for c in release.conversations}
    per_split = Counter(f"{'seen' if p['seen'] else 'unseen'}_{p['split']}" for p in kept)
    return {
        "source": str(directory),
        "utterances_checked": release.utterances_checked,
        "users_read": len(release.survey),
        "survey_only_users": sum(bool(row["survey_only"]) for row in release.survey.values()),  # flagged so
        "users_without_conversations": len(release.survey) - len(with_conversations),  # flagged or not
        "users_with_conversations": len(with_conversations),
        "users_dropped_min_conversations": len(split.dropped_users),
        "users_kept": len(split.seen),
        "seen_users": sum(split.seen.values()),
        "unseen_users": len(split.seen) - sum(split.seen.values()),
        "seen_pool_users": split.seen_pool,
        "unseen_pool_users": split.unseen_pool,
        "conversations": len(release.conversations),
        "conversations_kept": len(split.conversation_split),
        "turns": sum(len(c.turns) for c in release.conversations),
        "responses": sum(len(t.responses) for c in release.conversations for t in c.turns),
        "pairs_built": len(pairs),
        "pairs_kept": len(kept),
        "dropped": drops,
        "warnings": release.warnings,
        "pairs_per_split": {key: per_split[key] for key in ("seen_train", "seen_test", "unseen_train", "unseen_test")},
        "split": {**asdict(config), "protocol": "LoRe PRISM (Bose et al. 2025); see lore_core/prism_pairs.py"},
    }


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _write_outputs(out_dir: Path, files: dict[str, bytes]) -> None:
    """A new out_dir appears complete (temp dir + rename); an existing one gets each file replaced atomically,
    summary.json last, and a stale ground_truth.npz removed."""
    if out_dir.is_dir():
        old_pairs, embedded = out_dir / PAIRS_JSONL, out_dir / PAIRS_FILENAME
        if embedded.exists() and old_pairs.exists() and old_pairs.read_bytes() != files[PAIRS_JSONL]:
            # Embedded from the pairs being replaced: training on it would read the old split without a word.
            # Removed before the new pairs are written, so a crash in between cannot leave it beside them.
            embedded.unlink()
            warnings.warn(f"removed {embedded}: it embedded the pairs this run replaced; run `lore-fed embed "
                          f"{out_dir}` again", UserWarning, stacklevel=3)
        for name, data in sorted(files.items(), key=lambda item: item[0] == SUMMARY_JSON):
            atomic_write_bytes(out_dir / name, data)
        if GROUND_TRUTH_FILE not in files and (out_dir / GROUND_TRUTH_FILE).exists():
            (out_dir / GROUND_TRUTH_FILE).unlink()
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for name, data in files.items():
            with open(staging / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
