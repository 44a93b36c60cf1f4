"""What an epsilon check costs on a record-mode client's history, composing each mechanism once or as written.

    python -m simulations.bench_accounting [--rounds 5,10,20] [--repeats 3] [--out FILE]

A record-mode client's history is stored merged (Opacus and the ledger join consecutive equal segments), but each
round's budget checks add the planned round to it as a second segment of the same mechanism: the node's before it
trains (record_dp) and the server's prediction for every client seen (the ledger's `would_exceed`). Opacus runs its
RDP orders and PRV discretisation once per segment, so `lore_core.privacy.accounting` composes each (z, q) once with
its steps summed. This times `accounting._bounds` (what `epsilon_report` and `history_epsilon` call: PRV with its
error bound, and RDP) both ways, interleaved, on the same histories, and reports the median seconds, their ratio
and the largest difference in epsilon. `--out` defaults to bench_results/accounting_speed.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from lore_core.privacy import accounting
from simulations.bench_output import write_outputs

DELTA = 1e-5
SEGMENT = (1.0, 0.25, 4)  # one round of a client with 16 pairs, batch 4: z = 1, q = 1/4, 4 DP-SGD steps


def timed(segments: list, repeats: int) -> tuple[list[float], tuple]:
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = accounting._bounds(segments, DELTA)
        seconds.append(time.perf_counter() - started)
    return seconds, result


def measure(rounds: int, repeats: int) -> dict:
    z, q, steps = SEGMENT
    as_written = accounting.check_history([(z, q, steps * rounds), SEGMENT])  # the history, and the planned round
    composed = accounting._composed(as_written)
    written_s, composed_s, written, once = [], [], None, None
    for _ in range(repeats):  # interleaved, so that the machine's load falls on both alike
        seconds, written = timed(as_written, 1)
        written_s += seconds
        seconds, once = timed(composed, 1)
        composed_s += seconds
    names = ("prv_estimate", "prv", "rdp", "rdp_order")
    return {"rounds": rounds, "segments_as_written": len(as_written), "segments_composed": len(composed),
            "seconds_as_written": statistics.median(written_s), "seconds_composed": statistics.median(composed_s),
            "ratio": statistics.median(written_s) / statistics.median(composed_s),
            "epsilon_as_written": dict(zip(names, written)), "epsilon_composed": dict(zip(names, once)),
            "largest_epsilon_difference": max(abs(a - b) for a, b in zip(written[:3], once[:3]))}


def table(rows: list[dict], repeats: int) -> str:
    lines = ["# One epsilon check on a record client's history (`python -m simulations.bench_accounting`)", "",
             f"A record client's budget check: its history after `rounds` rounds of (z, q, steps) = {SEGMENT}, "
             f"stored merged, plus the planned round as a second segment; delta {DELTA:g}. `accounting._bounds` (PRV "
             "upper value and estimate, and RDP) on it as written and with each mechanism composed once. "
             f"Median of {repeats} runs each, interleaved, one thread.", "",
             "| rounds | segments | as written (s) | composed (s) | ratio | PRV epsilon | RDP epsilon "
             "| largest difference |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        once = row["epsilon_composed"]
        lines.append(f"| {row['rounds']} | {row['segments_as_written']} -> {row['segments_composed']} | "
                     f"{row['seconds_as_written']:.2f} | {row['seconds_composed']:.2f} | {row['ratio']:.1f} | "
                     f"{once['prv']:.4f} | {once['rdp']:.4f} | {row['largest_epsilon_difference']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", default="5,10,20")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_results/accounting_speed.md"))
    args = parser.parse_args()
    rows = [measure(int(r), args.repeats) for r in args.rounds.split(",")]
    write_outputs(args.out, table(rows, args.repeats), rows)


if __name__ == "__main__":
    main()
