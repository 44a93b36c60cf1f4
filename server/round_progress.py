"""How a running server shows its rounds: a progress bar in an interactive simulation, one log line per round in
a deployment (where the ServerApp's output goes to `flwr log`). The full per-round table is `rounds.jsonl`."""

from __future__ import annotations

import logging

from server.run_settings import PROGRESS_STYLES as STYLES

log = logging.getLogger("lore_fed.server")


class RoundProgress:
    def __init__(self, rounds: int, style: str = "log") -> None:
        if style not in STYLES:
            raise ValueError(f"progress style must be one of {STYLES}, got {style!r}")
        self.rounds, self.style, self._bar = rounds, style, None

    def __enter__(self) -> "RoundProgress":
        if self.style == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.rounds, desc="rounds", unit="round", dynamic_ncols=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, record: dict) -> None:
        summary = summarize(record)
        if self._bar is None:
            log.info("round %d  %s", record["round"], "  ".join(f"{k} {v}" for k, v in summary.items()))
            return
        self._bar.n = record["round"]  # resumed runs start part-way
        self._bar.set_postfix(summary, refresh=False)
        self._bar.refresh()


def summarize(record: dict) -> dict[str, str]:
    """The few figures of a round worth a glance: users, accuracy when evaluated, epsilon under DP."""
    out = {"users": f"{record.get('accepted_users', 0)}/{record['sampled_users']}"}
    if "seen_test_acc" in record:
        out.update(seen=f"{record['seen_test_acc']:.4f}", unseen=f"{record['unseen_test_acc']:.4f}")
    if "epsilon" in record:
        out["eps"] = f"{record['epsilon']:.3f}"
    if "record_epsilon_max" in record:
        out["pair_eps_max"] = f"{record['record_epsilon_max']:.3f}"
    if record.get("rejected_replies"):
        out["rejected"] = str(len(record["rejected_replies"]))
    return out
