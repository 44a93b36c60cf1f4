"""The `not-applicable` verdict: an audit whose question has no answer for the run says so, in the same result dict
(JSON, audits.md, ledger entry) as every other verdict, instead of measuring noise about a constant.

The case it covers: a basis with one row (B = 1, which `lore-fed train --rank auto` picks whenever personalisation
does not pay). The simplex over one row is the single point w = 1, so every user has the same weights: audits that
ask what w reveals about a user (extraction, attribute inference, record-level membership of w) have nothing to find.
Audits of the basis or of the updates themselves still apply and still run. `passed` is True: the property these
audits check (w does not give the user away) holds by construction; `applicable` is False so that no reader
mistakes it for a measurement.
"""

from __future__ import annotations

NOT_APPLICABLE = "not-applicable"
RANK_ONE_REASON = ("the basis has rank 1, so every user has the same weights (w = 1) and they carry no information "
                   "about the user")


def is_rank_one(basis_rows: int) -> bool:
    """True when the basis has a single row (B = 1): w = 1 for every user."""
    return int(basis_rows) == 1


def rank_one_result(audit: str, consequence: str, *, seed: int, **fields) -> dict:
    """The result of an audit of w on a rank-1 basis. consequence: what that means for this audit's question (one
    or two sentences, shown after the reason)."""
    return {
        "audit": audit, **fields, "verdict": NOT_APPLICABLE, "passed": True, "applicable": False,
        "summary": f"not applicable: {RANK_ONE_REASON}. {consequence}", "basis_rank": 1,
        "method": "not run: with one basis row the simplex is the single point w = 1, the same for every user",
        "seed": seed, "trials": 0,
    }
