"""Reading user-supplied UTF-8 text (JSON Lines, JSON, plain lines) with errors that name the file and line.

A UTF-8 byte-order mark at the start (common in exports from spreadsheets and Windows editors) is accepted and
dropped; a byte that is not UTF-8 is reported with its file, line and column instead of Python's bare codec message.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def _decode(raw: bytes, path: Path, line: int, error: type[ValueError]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line += raw[: exc.start].count(b"\n")
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise error(f"{path} line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); "
                    "save the file as UTF-8") from None


def not_a_file(what: str, path: str | Path) -> str:
    """Why `path` cannot be read as a file: missing, a directory, or something else (a directory passed for a file
    used to read "does not exist")."""
    path = Path(path)
    subject = f"{what} {path}" if what else str(path)
    if not path.exists():
        return f"{subject} does not exist"
    return f"{subject} is a directory, not a file" if path.is_dir() else f"{subject} is not a regular file"


def read_text(path: str | Path, error: type[ValueError] = ValueError, what: str = "") -> str:
    """The whole file as text (BOM dropped); a missing file (`not_a_file`, called `what`) or bad UTF-8 raises
    `error` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(not_a_file(what, path))
    raw = path.read_bytes()
    return _decode(raw.removeprefix(codecs.BOM_UTF8), path, 1, error)


def read_jsonl(path: str | Path, error: type[ValueError] = ValueError) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for every non-blank line, streaming; bad UTF-8, bad JSON, text that is
    not Unicode (a lone surrogate escape) or a value that is not an object raises `error` naming the file and
    line."""
    path = Path(path)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            text = _decode(raw, path, number, error).rstrip("\r\n")
            if not text.strip():
                continue
            record = parse_json(text, path, error, line=number)
            _refuse_lone_surrogates(record, text, path, error, number)
            if not isinstance(record, dict):
                raise error(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def json_records(text: str, path: str | Path, error: type[ValueError], item: str) -> tuple[object, list[str]]:
    """The records of a JSON list or of JSON Lines, with where each is: `item` N in a list, its line in JSON Lines (a
    record's problem is named as a syntax error is: "choice 1" was line 4; a tester). Lines end at "\n" only, as
    `read_jsonl`'s do: U+2028 and the like may stand unescaped in a JSON string. One object spread over several
    lines is returned whole, for the caller to refuse as what it is."""
    lines = [(number, line.rstrip("\r")) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    start = text.lstrip()[:1]
    if start == "[" or (start == "{" and not _is_json(lines[0][1])):
        records = parse_json(text, path, error)
        return records, [f"{item} {number}" for number in range(1, len(records) + 1)] if isinstance(records, list) \
            else []
    return [parse_json(line, path, error, line=number) for number, line in lines], [f"line {n}" for n, _ in lines]


def _is_json(text: str) -> bool:
    try:
        json_loads(text)
    except ValueError:
        return False
    return True


def json_loads(text: str | bytes):
    """json.loads, with nesting too deep for Python's recursion a ValueError like any other bad JSON (a tester: a
    state or run file nested 100,000 deep crashed every command that read it with RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def parse_json(text: str, path: str | Path, error: type[ValueError] = ValueError, line: int = 1):
    """json.loads(text) with an error that names the file and the line (`line`: where `text` starts)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path} line {line + exc.lineno - 1}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    except RecursionError:
        raise error(f"{path} line {line}: JSON nested too deeply") from None
    except ValueError:  # json turns an integer of more digits than Python converts (4,300) into a bare ValueError
        digits = sys.get_int_max_str_digits()
        long = re.search(rf"\d{{{digits + 1},}}", text)
        at = line + text.count("\n", 0, long.start()) if long else line
        raise error(f"{path} line {at}: a number with more than {digits} digits, which Python does not read") from None


# An escaped UTF-16 surrogate without its other half: json.loads accepts it, but the string it makes is not Unicode
# text (it cannot be encoded as UTF-8, so hashing or tokenizing it fails far from the file).
_LONE_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
                             r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _refuse_lone_surrogates(value, text: str, path: str | Path, error: type[ValueError], line: int) -> None:
    """Raise `error` naming the line when a string (or key) of `value` holds a lone surrogate. The text is searched
    first, so the parsed value is walked only when such an escape is there."""
    match = _LONE_SURROGATE.search(text)
    if match is None or _is_unicode(value):
        return
    raise error(f"{path} line {line + text.count(chr(10), 0, match.start())}: {match.group()} is half of a "
                "UTF-16 surrogate pair, not a character; the text must be valid Unicode")


def _is_unicode(value) -> bool:
    """Every string in `value` (a parsed JSON value, walked without recursion) encodes as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
    return True


# Unicode's bidirectional controls (marks, embeddings, overrides, isolates): U+202E in an id printed in a message
# or report reverses the text after it, so a line can read as another (a tester's).
BIDI_CONTROLS = frozenset([0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def is_name(value) -> bool:
    """A name a file may carry (an embedder's, a user's id): a non-empty string without control characters. A NUL
    or a newline in one (a tester's) would cut or forge lines of the logs and reports that print it."""
    return isinstance(value, str) and bool(value) and \
        not any(ord(c) < 32 or 127 <= ord(c) < 160 or ord(c) in BIDI_CONTROLS for c in value)


def names_refused(names) -> list[str]:
    """The distinct entries of a unicode array that are not names (`is_name`), found without a loop over them:
    empty, or holding a control character (an inner NUL included)."""
    names = np.asarray(names).ravel()
    if names.dtype.kind != "U" or names.size == 0:
        return []
    refused = [_refused(names[start:start + NAME_CHUNK]) for start in range(0, names.size, NAME_CHUNK)]
    return np.unique(np.concatenate(refused)).tolist()


NAME_CHUNK = 1 << 14  # names_refused's temporaries follow a chunk of names, not all of them (a reviewer)
_BIDI_CODES = np.fromiter(sorted(BIDI_CONTROLS), np.uint32)


def _refused(names: np.ndarray) -> np.ndarray:
    names = np.ascontiguousarray(names.astype(f"<U{max(1, names.dtype.itemsize // 4)}"))
    codes = names.view(np.uint32).reshape(names.size, -1)
    control = ((codes > 0) & (codes < 32)) | ((codes >= 127) & (codes < 160)) | np.isin(codes, _BIDI_CODES)
    length = np.char.str_len(names)
    return names[(length == 0) | control.any(axis=1) | ((codes != 0).sum(axis=1) < length)]


_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f" + "".join(map(chr, sorted(BIDI_CONTROLS))) + "]")


def shown(text: str) -> str:
    """`text` for a terminal: control characters (but tab) and bidirectional controls escaped as in Python
    (\\x1b, \\u202e). A response holding ESC or U+202E printed raw drove the user's terminal (a tester)."""
    return _UNPRINTABLE.sub(lambda match: ascii(match.group())[1:-1], text)


def ids_message(where, what: str, refused: list[str]) -> str:
    """The error for `what` ids that `names_refused` found, each shown escaped (never raw: see BIDI_CONTROLS)."""
    shown = ", ".join(ascii(name) for name in refused[:3])
    return (f"{where}: {what} must be non-empty text without control or bidirectional-control characters (they are "
            f"printed in messages and reports); {len(refused)} {'is' if len(refused) == 1 else 'are'} not: {shown}")


def normalisation_twins(names) -> list[list[str]]:
    """Groups of distinct names that are one text in Unicode's NFC form ('é' composed, or 'e' and a combining
    accent): printed alike, so one person to a reader and two users to the code (a tester's). Only names outside
    ASCII are normalised (ASCII text is its own NFC), found without a loop over the others."""
    names = np.unique(np.asarray(names).ravel())
    if names.dtype.kind != "U" or names.size < 2:
        return []
    wide = names[(np.ascontiguousarray(names).view(np.uint32).reshape(names.size, -1) > 127).any(axis=1)]
    groups: dict[str, list[str]] = {}
    for name in wide.tolist():
        groups.setdefault(unicodedata.normalize("NFC", name), []).append(name)
    for form, group in groups.items():  # an NFC form may be ASCII (the Kelvin sign's is 'K'): then a name too
        if form.isascii() and np.isin(form, names):
            group.append(form)
    return [sorted(group) for group in groups.values() if len(group) > 1]


def twins_message(where, what: str, groups: list[list[str]]) -> str:
    """The error for `what` ids that `normalisation_twins` found, shown escaped."""
    shown = "; ".join(" and ".join(ascii(name) for name in group) for group in groups[:3])
    return (f"{where}: {len(groups)} group(s) of {what} are the same text in different Unicode forms ({shown}): "
            "printed alike, they would be separate users; write every id in one form (NFC: "
            "unicodedata.normalize('NFC', id))")


def is_json_integer(value, low: int = 0, high: int = 2**63 - 1) -> bool:
    """Whether a value read from JSON is an integer in [low, high]: not a float (2.5, Infinity, which Python's json
    reads), a bool (true is an int to Python) or a string of digits."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
