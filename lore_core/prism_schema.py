"""Strict reader for the PRISM release (Kirk et al. 2024): `survey.jsonl`, `conversations.jsonl`, `utterances.jsonl`.

Every line is parsed by key (key order varies between release outputs) and checked against the published schema
(see docs/prism-and-embeddings.md §1). Anything malformed raises `PrismSchemaError` naming the file, the
1-based line and what was expected. What the real release contains is tolerated: nulls inside attribute and survey
objects, `{}` attributes, survey-only users, `within_turn_id` as int or digit string, identical A/B responses that
are both chosen, turns nobody chose in. Such turns are kept here and dropped (and counted) by `prism_pairs`.

Checked invariants per conversation: one user message opens each turn, turns contiguous from 0,
`conversation_turns == max turn + 1`, `opening_prompt == history[0].content`, 2-4 responses at turn 0 and exactly 2
later, distinct `within_turn_id`s in a turn, scores int in 1..100, at most one chosen response at turn 0, several
chosen responses only when their texts are identical, later turns answered by the turn-0 chosen model, the user in
the survey and not marked survey-only. `utterances.jsonl` is optional; when present it must equal
`derive_utterances(conversations)` row by row.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from lore_core import text_file

SURVEY_FILE = "survey.jsonl"
CONVERSATIONS_FILE = "conversations.jsonl"
# A benchmark's hidden truth beside the release files (written by `lore-fed synth`, copied by `prepare`, read by
# `embed`): never part of the PRISM schema itself.
GROUND_TRUTH_FILE = "ground_truth.npz"
UTTERANCES_FILE = "utterances.jsonl"
EMPTY_RESPONSE = "EMPTY STRING"  # how the release stores an empty or missing model text
SCORE_MIN, SCORE_MAX = 1, 100
TURN0_RESPONSES = (2, 4)  # inclusive range of responses to the opening prompt
LATER_RESPONSES = 2  # A/B from the turn-0 chosen model


def population_written(directory: str | Path) -> bool:
    """A `lore-fed synth` population is complete: its truth (written first) and the three release files after it.
    The truth alone is no sign of it: a write cut short leaves the truth without them."""
    names = (GROUND_TRUTH_FILE, SURVEY_FILE, CONVERSATIONS_FILE, UTTERANCES_FILE)
    return all((Path(directory) / name).is_file() for name in names)


class PrismSchemaError(ValueError):
    """A PRISM file that does not follow the release schema."""


# --- value kinds: (check, description) ------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "str|null": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a number"),
    "number|null": (lambda v: v is None or _is_number(v), "a number or null"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "id": (lambda v: _is_int(v) or (isinstance(v, str) and v.isascii() and v.isdigit()), "an int or digit string"),
    # user and conversation ids become numpy text in pairs.npz, which drops trailing NULs ('u\x00' would be 'u'),
    # and are printed in messages and reports (text_file.is_name)
    "name": (text_file.is_name, "a non-empty string without control or bidirectional-control characters"),
}

# One source of truth for the key sets: the schemas below (insertion order = the codebook's order).
SURVEY_SCHEMA: dict[str, str] = {
    "user_id": "name", "survey_only": "bool", "num_completed_conversations": "int", "timing_duration_s": "number",
    "timing_duration_mins": "number", "generated_datetime": "str", "consent": "str", "consent_age": "str",
    "lm_familiarity": "str", "lm_indirect_use": "str", "lm_direct_use": "str", "lm_frequency_use": "str|null",
    "self_description": "str", "system_string": "str", "age": "str", "gender": "str", "employment_status": "str",
    "education": "str", "marital_status": "str", "english_proficiency": "str", "study_id": "str",
    "study_locale": "str", "religion": "object", "ethnicity": "object", "location": "object",
    "lm_usecases": "object", "stated_prefs": "object", "order_lm_usecases": "object", "order_stated_prefs": "object",
    "included_in_US_REP": "bool", "included_in_UK_REP": "bool", "included_in_balanced_subset": "bool",
}  # fmt: skip
CONVERSATION_SCHEMA: dict[str, str] = {
    "conversation_id": "name", "user_id": "name", "included_in_balanced_subset": "bool", "generated_datetime": "str",
    "timing_duration_s": "number", "timing_duration_mins": "number", "conversation_type": "str",
    "opening_prompt": "str", "conversation_turns": "int", "conversation_history": "list",
    "performance_attributes": "object", "choice_attributes": "object", "open_feedback": "str",
}  # fmt: skip
USER_MESSAGE_SCHEMA: dict[str, str] = {"turn": "int", "role": "str", "content": "str"}
MODEL_MESSAGE_SCHEMA: dict[str, str] = {
    "turn": "int", "role": "str", "content": "str", "model_provider": "str", "model_name": "str", "score": "int",
    "if_chosen": "bool", "within_turn_id": "id",
}  # fmt: skip
UTTERANCE_SCHEMA: dict[str, str] = {
    "utterance_id": "str", "interaction_id": "str", "conversation_id": "name", "user_id": "name", "turn": "int",
    "within_turn_id": "id", "included_in_balanced_subset": "bool", "conversation_type": "str", "user_prompt": "str",
    "model_response": "str", "model_name": "str", "model_provider": "str", "score": "int", "if_chosen": "bool",
}  # fmt: skip
# Nested survey objects: the value kind of every entry (keys themselves are not fixed: the codebook and the
# release code disagree on `location`); `*_text` entries are free text.
_SURVEY_NESTED_VALUES = {
    "religion": "str|null", "ethnicity": "str|null", "location": "str|null",
    "lm_usecases": "number|null", "stated_prefs": "number|null",
    "order_lm_usecases": "number|null", "order_stated_prefs": "number|null",
}  # fmt: skip
_ATTRIBUTE_KEYS = ("performance_attributes", "choice_attributes")


@dataclass(frozen=True)
class Response:
    """One scored model response of a turn."""

    text: str
    score: int
    chosen: bool
    within_turn_id: int
    model_name: str
    model_provider: str


@dataclass(frozen=True)
class Turn:
    index: int
    prompt: str
    responses: tuple[Response, ...]

    @property
    def chosen(self) -> tuple[Response, ...]:
        return tuple(r for r in self.responses if r.chosen)


@dataclass(frozen=True)
class Conversation:
    conversation_id: str
    user_id: str
    conversation_type: str
    included_in_balanced_subset: bool
    turns: tuple[Turn, ...]
    line: int  # 1-based line in conversations.jsonl


@dataclass(frozen=True)
class PrismRelease:
    """A validated release: survey rows by user id (file order) and conversations (file order)."""

    directory: Path
    survey: dict[str, dict]
    conversations: tuple[Conversation, ...]
    utterances_checked: bool
    warnings: dict[str, int]  # tolerated oddities worth reporting, e.g. top-score ties at turn 0


# --- reading --------------------------------------------------------------------------------------------------------
def _error(path: Path, line: int, message: str) -> PrismSchemaError:
    return PrismSchemaError(f"{path} line {line}: {message}")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for every non-blank line; a leading UTF-8 BOM is dropped; bad UTF-8/JSON
    or a non-object raises PrismSchemaError naming the file and line."""
    return text_file.read_jsonl(path, PrismSchemaError)


def _check_record(record: dict, schema: dict[str, str], path: Path, line: int, what: str) -> None:
    """Exact key set and value kinds; `what` names the record in messages (e.g. 'conversation_history[3]')."""
    missing = [key for key in schema if key not in record]
    if missing:
        raise _error(path, line, f"{what}: missing key(s) {missing} (expected all {len(schema)} keys of the schema)")
    unknown = sorted(set(record) - set(schema))
    if unknown:
        raise _error(path, line, f"{what}: unexpected key(s) {unknown}; expected keys {sorted(schema)}")
    for key, kind in schema.items():
        check, description = _KINDS[kind]
        if not check(record[key]):
            raise _error(path, line, f"{what}: '{key}' must be {description}, got {_show(record[key])}")


def _check_values(obj: dict, kind: str, path: Path, line: int, what: str) -> None:
    check, description = _KINDS[kind]
    for key, value in obj.items():
        expected = _KINDS["str|null"] if key.endswith("_text") else (check, description)
        if not expected[0](value):
            raise _error(path, line, f"{what}['{key}'] must be {expected[1]}, got {_show(value)}")


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _read_survey(path: Path) -> tuple[dict[str, dict], dict[str, int]]:
    survey: dict[str, dict] = {}
    lines: dict[str, int] = {}
    for line, record in read_jsonl(path):
        _check_record(record, SURVEY_SCHEMA, path, line, "survey row")
        for key, kind in _SURVEY_NESTED_VALUES.items():
            _check_values(record[key], kind, path, line, key)
        user = record["user_id"]
        if user in survey:
            raise _error(path, line, f"duplicate user_id '{user}' (first on line {lines[user]})")
        survey[user] = record
        lines[user] = line
    if not survey:
        raise PrismSchemaError(f"{path}: no survey rows")
    return survey, lines


def _parse_history(record: dict, path: Path, line: int) -> tuple[Turn, ...]:
    """Group the chronological history into turns: one user message, then that turn's model responses."""
    turns: list[tuple[str, list[Response]]] = []
    for position, message in enumerate(record["conversation_history"]):
        where = f"conversation_history[{position}]"
        if not isinstance(message, dict):
            raise _error(path, line, f"{where} must be an object, got {_show(message)}")
        role = message.get("role")
        if role not in ("user", "model"):
            raise _error(path, line, f"{where}: 'role' must be 'user' or 'model', got {_show(role)}")
        _check_record(message, USER_MESSAGE_SCHEMA if role == "user" else MODEL_MESSAGE_SCHEMA, path, line, where)
        turn = message["turn"]
        if role == "user":
            if turn != len(turns):
                raise _error(
                    path, line, f"{where}: user message for turn {turn}, expected turn {len(turns)} "
                    "(turns are contiguous from 0 with one user message each)"
                )
            turns.append((message["content"], []))
            continue
        if not turns or turn != len(turns) - 1:
            raise _error(path, line, f"{where}: model response for turn {turn} does not follow its user message")
        if not SCORE_MIN <= message["score"] <= SCORE_MAX:
            raise _error(path, line, f"{where}: 'score' must be in {SCORE_MIN}..{SCORE_MAX}, got {message['score']}")
        turns[-1][1].append(
            Response(
                text=message["content"],
                score=message["score"],
                chosen=message["if_chosen"],
                within_turn_id=int(message["within_turn_id"]),
                model_name=message["model_name"],
                model_provider=message["model_provider"],
            )
        )
    return tuple(Turn(index, prompt, tuple(responses)) for index, (prompt, responses) in enumerate(turns))


def _check_turns(turns: tuple[Turn, ...], record: dict, path: Path, line: int) -> None:
    if not turns:
        raise _error(path, line, "conversation_history is empty; expected at least one turn")
    if record["conversation_turns"] != len(turns):
        raise _error(
            path, line, f"conversation_turns is {record['conversation_turns']} but the history has turns "
            f"0..{len(turns) - 1} (expected max turn + 1 = {len(turns)})"
        )
    if record["opening_prompt"] != turns[0].prompt:
        raise _error(path, line, "opening_prompt differs from the first user message of conversation_history")
    opener_chosen = turns[0].chosen
    if len(opener_chosen) > 1:
        raise _error(path, line, f"turn 0 has {len(opener_chosen)} chosen responses; expected exactly one")
    for turn in turns:
        low, high = TURN0_RESPONSES if turn.index == 0 else (LATER_RESPONSES, LATER_RESPONSES)
        if not low <= len(turn.responses) <= high:
            expected = f"{low}-{high}" if low != high else str(low)
            raise _error(path, line, f"turn {turn.index} has {len(turn.responses)} responses; expected {expected}")
        ids = [r.within_turn_id for r in turn.responses]
        if len(set(ids)) != len(ids):
            raise _error(path, line, f"turn {turn.index}: repeated within_turn_id in {ids}")
        if len({r.text for r in turn.chosen}) > 1:
            raise _error(path, line, f"turn {turn.index}: several chosen responses with different texts")
        if turn.index and opener_chosen:
            others = sorted({r.model_name for r in turn.responses} - {opener_chosen[0].model_name})
            if others:
                raise _error(
                    path, line, f"turn {turn.index} answered by {others}; later turns must come from the turn-0 "
                    f"chosen model '{opener_chosen[0].model_name}'"
                )


def _read_conversations(
    path: Path, survey: dict[str, dict], survey_lines: dict[str, int], survey_path: Path
) -> tuple[tuple[Conversation, ...], dict[str, int]]:
    conversations: list[Conversation] = []
    first_line: dict[str, int] = {}
    warnings: Counter = Counter()
    for line, record in read_jsonl(path):
        _check_record(record, CONVERSATION_SCHEMA, path, line, "conversation")
        for key in _ATTRIBUTE_KEYS:
            _check_values(record[key], "number|null", path, line, key)
        conversation_id, user = record["conversation_id"], record["user_id"]
        if conversation_id in first_line:
            raise _error(path, line, f"duplicate conversation_id '{conversation_id}' (first on line "
                         f"{first_line[conversation_id]})")  # fmt: skip
        if user not in survey:
            # a tester: two forms of one name printed alike (an ASCII one too: the Kelvin sign's NFC is 'K')
            form = next((u for u in survey if unicodedata.normalize("NFC", u) == unicodedata.normalize("NFC", user)),
                        None)
            raise _error(path, line, f"user_id {ascii(user)} of {conversation_id} is not in {survey_path}" + (
                f" (it holds {ascii(form)}, the same text in another Unicode form: write every id in one form, "
                "NFC)" if form is not None else ""))
        if survey[user]["survey_only"]:
            raise _error(
                path, line, f"user '{user}' is marked survey_only in {survey_path} line {survey_lines[user]} "
                f"but has conversation {conversation_id}"
            )
        turns = _parse_history(record, path, line)
        _check_turns(turns, record, path, line)
        opener = turns[0]
        if opener.chosen and sum(r.score == opener.chosen[0].score for r in opener.responses) > 1:
            warnings["turn0_top_score_ties"] += 1
        first_line[conversation_id] = line
        conversations.append(
            Conversation(
                conversation_id=conversation_id,
                user_id=user,
                conversation_type=record["conversation_type"],
                included_in_balanced_subset=record["included_in_balanced_subset"],
                turns=turns,
                line=line,
            )
        )
    if not conversations:
        raise PrismSchemaError(f"{path}: no conversations")
    return tuple(conversations), dict(warnings)


# --- utterances -----------------------------------------------------------------------------------------------------
def derive_utterances(conversations: tuple[Conversation, ...] | list[Conversation]) -> list[dict]:
    """The release's `utterances.jsonl` rows: one per model response, in conversation then history order.

    `interaction_id` numbers the sorted (conversation_id as a string, turn) keys, as the release does.
    """
    rows = [
        {
            "conversation_id": c.conversation_id,
            "user_id": c.user_id,
            "turn": turn.index,
            "within_turn_id": r.within_turn_id,
            "included_in_balanced_subset": c.included_in_balanced_subset,
            "conversation_type": c.conversation_type,
            "user_prompt": turn.prompt,
            "model_response": r.text,
            "model_name": r.model_name,
            "model_provider": r.model_provider,
            "score": r.score,
            "if_chosen": r.chosen,
        }
        for c in conversations
        for turn in c.turns
        for r in turn.responses
    ]
    group = {key: i for i, key in enumerate(sorted({(r["conversation_id"], r["turn"]) for r in rows}))}
    return [
        {
            "utterance_id": f"ut{i}",
            "interaction_id": f"int{group[(r['conversation_id'], r['turn'])]}",
            **r,
        }
        for i, r in enumerate(rows)
    ]


def _same(a: Any, b: Any) -> bool:
    # True == 1 in Python; a bool must only ever match a bool.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _check_utterances(path: Path, conversations: tuple[Conversation, ...], conversations_path: Path) -> None:
    expected = derive_utterances(conversations)
    count = 0
    for line, record in read_jsonl(path):
        _check_record(record, UTTERANCE_SCHEMA, path, line, "utterance")
        if count >= len(expected):
            raise _error(path, line, f"extra row; {conversations_path} implies {len(expected)} utterances")
        want = expected[count]
        got = {**record, "within_turn_id": int(record["within_turn_id"])}
        for key in UTTERANCE_SCHEMA:
            if not _same(got[key], want[key]):
                raise _error(
                    path, line, f"'{key}' is {_show(record[key])} but {conversations_path} gives {_show(want[key])} "
                    f"for row {count} ({want['conversation_id']}, turn {want['turn']}, within_turn_id "
                    f"{want['within_turn_id']}); utterances must equal the derivation from conversations"
                )
        count += 1
    if count != len(expected):
        raise PrismSchemaError(f"{path}: has {count} utterance rows but {conversations_path} implies {len(expected)}")


# --- entry point ----------------------------------------------------------------------------------------------------
def load_release(directory: str | Path) -> PrismRelease:
    """Read and validate a PRISM release directory (survey + conversations required, utterances optional)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PrismSchemaError(f"{directory} is not a directory holding {SURVEY_FILE} and {CONVERSATIONS_FILE}")
    paths = {name: directory / name for name in (SURVEY_FILE, CONVERSATIONS_FILE, UTTERANCES_FILE)}
    for name in (SURVEY_FILE, CONVERSATIONS_FILE):
        if not paths[name].exists():
            raise PrismSchemaError(f"{directory}: missing required file {name}")
        if not paths[name].is_file():  # a directory was reported "missing"
            raise PrismSchemaError(f"{directory}: {text_file.not_a_file('required file', paths[name])}")
    if paths[UTTERANCES_FILE].exists() and not paths[UTTERANCES_FILE].is_file():  # a tester: it was skipped unread
        raise PrismSchemaError(f"{directory}: {text_file.not_a_file('optional file', paths[UTTERANCES_FILE])}")
    survey, survey_lines = _read_survey(paths[SURVEY_FILE])
    conversations, warnings = _read_conversations(
        paths[CONVERSATIONS_FILE], survey, survey_lines, paths[SURVEY_FILE]
    )
    has_utterances = paths[UTTERANCES_FILE].is_file()
    if has_utterances:
        _check_utterances(paths[UTTERANCES_FILE], conversations, paths[CONVERSATIONS_FILE])
    return PrismRelease(directory, survey, conversations, has_utterances, warnings)
