"""Settings named in error messages, spelled the way the reader types them.

One validation serves several entry points: `lore-fed simulate` (flags: `--eval-every 0`), `lore-fed deploy local`
(`-c eval-every=0`), a Flower run config (pyproject.toml: `eval-every = 0`) and PrivacySettings' fields
(`clip_norm`). A check names each setting it mentions with `setting(name)` or `setting(name, value)` inside its
message and raises a SettingError: str() spells the names the error class's default way, and an entry point that
knows how its user spells them renders the same message with `error.spelled(spelling)`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

NO_VALUE: Any = object()
Spelling = Callable[[str, Any], str]  # (name, value or NO_VALUE) -> how the reader writes it

_MARK = "\x1f"  # ASCII unit separator: never part of a message's own text
_TOKEN = re.compile(f"{_MARK}([^{_MARK}=]+)(?:=([^{_MARK}]*))?{_MARK}")


def setting(name: str, value: Any = NO_VALUE) -> str:
    """A setting (with `value`: the setting set to it, a bool, number or string) as it goes into a message."""
    return f"{_MARK}{name}{_MARK}" if value is NO_VALUE else f"{_MARK}{name}={json.dumps(value)}{_MARK}"


def spell(template: str, spelling: Spelling) -> str:
    """A message with every `setting` in it written by `spelling`."""
    return _TOKEN.sub(lambda m: spelling(m[1], NO_VALUE if m[2] is None else json.loads(m[2])), template)


def as_field(name: str, value: Any = NO_VALUE) -> str:
    """A field of a settings object: `clip_norm`, `clip_norm = 0.25`."""
    return name if value is NO_VALUE else f"{name} = {json.dumps(value)}"


def as_run_config(key: str, value: Any = NO_VALUE) -> str:
    """A Flower run-config key (pyproject.toml's [tool.flwr.app.config]): run config `eval-every`, eval-every = 0."""
    return f"run config `{key}`" if value is NO_VALUE else f"{key} = {json.dumps(value)}"


def as_option(option: str) -> Spelling:
    """Run-config keys as given by an option of key=value pairs (`deploy local -c`): -c eval-every=0."""
    return lambda key, value=NO_VALUE: f"{option} {key}" if value is NO_VALUE else f"{option} {key}={json.dumps(value)}"


def as_flags(flag_of: Callable[[str], str | None]) -> Spelling:
    """Run-config keys as command-line flags (`simulate`: --eval-every 0, --allow-uncovered-eval); a key that no flag
    sets (`flag_of` gives None) stays a run-config key."""
    def spelled(key: str, value: Any = NO_VALUE) -> str:
        flag = flag_of(key)
        if flag is None:
            return as_run_config(key, value)
        if value is NO_VALUE or value is True:  # True: a switch
            return flag
        return f"{flag} {value}" if value is not False else f"without {flag}"
    return spelled


class SettingError(ValueError):
    """A setting that cannot work; the message names settings with `setting` (by default run-config keys)."""

    spelling: Spelling = staticmethod(as_run_config)

    def __init__(self, template: str):
        super().__init__(template)
        self.template = template

    def __str__(self) -> str:
        return spell(self.template, self.spelling)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def spelled(self, spelling: Spelling) -> str:
        return spell(self.template, spelling)


def shown_value(value: Any) -> str:
    """A setting's value in a refusal of a changed setting (a checkpoint's, a release record's): short floats, and a
    group of settings (the privacy ones) by their keys."""
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k.replace('_', '-')} {shown_value(v)}" for k, v in value.items()) + ")"
    return f"{value:.6g}" if isinstance(value, float) else repr(value)


def shown_change(name: str, then: Any, now: Any) -> str:
    """`name then-value then, now-value now`, short where the short forms differ and exact where they do not (a
    tester's --server-lr 1.0000000001 was refused as "server-lr 1 then, 1 now")."""
    before, after = shown_value(then), shown_value(now)
    if before == after:
        before, after = repr(then), repr(now)
    return f"{name} {before} then, {after} now"
