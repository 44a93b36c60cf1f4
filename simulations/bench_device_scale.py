"""How often would a deployment node's own scale check (pairs.DEVICE_DIFF_RMS) refuse a usual file?

    python -m simulations.bench_device_scale PAIRS.npz [PAIRS.npz ...] [--about TEXT] [--out FILE]

A node holds one user's pairs, or a few, so its check sees far fewer pairs than `simulate`'s (USUAL_DIFF_RMS over
a whole population). For each file this runs the check's own functions on every single pair (a device the check
skips, below DEVICE_MIN_PAIRS, shown for scale), on every DEVICE_MIN_PAIRS consecutive pairs of one user (the
fewest a node checks) and on every user's pairs, under both bands: how many would be refused, and the extremes of
the measured scale (the median coordinate's rms times sqrt(D)) and of a coordinate's ratio to it. The files' own
scale is what `embed` (MiniLM) and the synthetic populations write, so any refusal here is a false one. `--out`
defaults to bench_results/device_scale.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lore_core.pairs import (DEVICE_DIFF_RMS, DEVICE_MIN_PAIRS, USUAL_DIFF_RMS, PairFileError, _coordinate_ratios,
                             check_federated_scale, load_pairs)
from simulations.bench_output import write_outputs

BANDS = {"simulate (USUAL_DIFF_RMS)": USUAL_DIFF_RMS, "device (DEVICE_DIFF_RMS)": DEVICE_DIFF_RMS}
KINDS = ("one pair", f"{DEVICE_MIN_PAIRS} pairs of a user", "one user")


def devices(pairs) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each kind of device's summed squared differences (m, D) and pair counts (m,): every single pair; every
    DEVICE_MIN_PAIRS consecutive pairs of one user (the fewest a node checks); every user's pairs."""
    diff = pairs.diff.astype(np.float64)
    order = np.argsort(pairs.user, kind="stable")
    squares, user = (diff * diff)[order], pairs.user[order]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    position = np.arange(len(user)) - np.repeat(starts, np.diff(np.r_[starts, len(user)]))
    group = np.cumsum(np.r_[True, (user[1:] != user[:-1]) | (position[1:] % DEVICE_MIN_PAIRS == 0)]) - 1
    by_group, group_size = _sums(squares, group)
    full = group_size == DEVICE_MIN_PAIRS
    by_user, user_size = _sums(squares, np.cumsum(np.r_[True, user[1:] != user[:-1]]) - 1)
    return {KINDS[0]: (squares, np.ones(len(squares))), KINDS[1]: (by_group[full], group_size[full]),
            KINDS[2]: (by_user, user_size)}


def _sums(squares: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows summed by consecutive label (0, 1, ...): (sums (m, D), counts (m,))."""
    starts = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    return np.add.reduceat(squares, starts, axis=0), np.diff(np.r_[starts, len(label)]).astype(np.float64)


def measure(path: Path) -> dict:
    """Per kind of device: the extremes of the measured scale and ratio (pairs._coordinate_ratios), and how many
    each band refuses (check_federated_scale itself)."""
    pairs = load_pairs(path)
    out = {"file": str(path), "pairs": int(pairs.n), "dim": int(pairs.diff.shape[1])}
    for kind, (squares, counts) in devices(pairs).items():
        measured = [_coordinate_ratios(row, n) for row, n in zip(squares, counts)]
        medians = np.array([median for median, _ in measured])
        row = {"devices": len(measured), "scale_min": float(medians.min()), "scale_max": float(medians.max()),
               "ratio_max": float(max(ratio.max() for _, ratio in measured))}
        for name, band in BANDS.items():
            row[name] = sum(_refuses(row_squares, n, band) for row_squares, n in zip(squares, counts))
        out[kind] = row
    return out


def _refuses(squares: np.ndarray, n: float, band: tuple[float, float]) -> bool:
    """Whether check_federated_scale refuses a device of these summed squares over n pairs in `band`."""
    try:
        check_federated_scale(squares, n, "device", band=band)
    except PairFileError:
        return True
    return False


def table(rows: list[dict], about: str) -> str:
    lines = ["# A deployment node's own scale check on usual files (`python -m simulations.bench_device_scale`)", "",
             f"Each device is one pair (which a node does not check), {DEVICE_MIN_PAIRS} consecutive pairs of one user "
             "(the fewest a node checks) or one user's pairs. `scale` is the median coordinate's rms times "
             "sqrt(D); `ratio` a coordinate's over it. Refused: how many devices a band would refuse (all false "
             f"refusals: these files are at the usual scale). simulate's band is {USUAL_DIFF_RMS}, a node's "
             f"{DEVICE_DIFF_RMS} (the upper bound also caps the ratio). {about}", "",
             "| file | devices | count | scale min .. max | ratio max | refused, simulate's band | refused, a node's |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for kind in KINDS:
            m = row[kind]
            lines.append(f"| {row['file']} | {kind} | {m['devices']} | {m['scale_min']:.3g} .. "
                         f"{m['scale_max']:.3g} | {m['ratio_max']:.3g} | {m['simulate (USUAL_DIFF_RMS)']} | "
                         f"{m['device (DEVICE_DIFF_RMS)']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", nargs="+", type=Path)
    parser.add_argument("--about", default="", help="where the files come from, for the table's header")
    parser.add_argument("--out", type=Path, default=Path("bench_results/device_scale.md"))
    args = parser.parse_args()
    rows = [measure(path) for path in args.pairs]
    write_outputs(args.out, table(rows, args.about), rows)


if __name__ == "__main__":
    main()
