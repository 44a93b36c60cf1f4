"""How often would a deployment node's own scale check (pairs.DEVICE_DIFF_RMS) refuse a usual file?

    python -m simulations.bench_device_scale PAIRS.npz [PAIRS.npz ...] [--about TEXT] [--out FILE]

A node holds one user's pairs, or a few, so its check sees far fewer pairs than `simulate`'s (USUAL_DIFF_RMS over
a whole population). For each file this measures the check on every single pair (the thinnest device) and on every
user's own pairs, under both bands: how many would be refused, and the extremes of the measured scale (the median
coordinate's rms times sqrt(D)) and of a coordinate's ratio to it. The files' own scale is what `embed` (MiniLM)
and the synthetic populations write, so any refusal here is a false one. `--out` defaults to
bench_results/device_scale.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lore_core.pairs import DEVICE_DIFF_RMS, USUAL_DIFF_RMS, load_pairs
from simulations.bench_output import write_outputs

BANDS = {"simulate (USUAL_DIFF_RMS)": USUAL_DIFF_RMS, "device (DEVICE_DIFF_RMS)": DEVICE_DIFF_RMS}


def scales(squares: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per device (rows of summed squared differences (m, D) over counts (m,) pairs): the median nonzero
    coordinate's scale and the largest coordinate's ratio to it, as pairs._coordinate_ratios computes them."""
    scale = np.sqrt(squares / counts[:, None] * squares.shape[1])
    masked = np.where(scale > 0, scale, np.nan)
    median = np.nan_to_num(np.nanmedian(masked, axis=1), nan=1.0)
    return median, scale.max(axis=1) / median


def measure(path: Path) -> dict:
    pairs = load_pairs(path)
    diff = pairs.diff.astype(np.float64)
    _, user_of_row = np.unique(pairs.user, return_inverse=True)
    by_user = np.zeros((user_of_row.max() + 1, diff.shape[1]))
    np.add.at(by_user, user_of_row, diff * diff)
    devices = {"one pair": (diff * diff, np.ones(len(diff))),
               "one user": (by_user, np.bincount(user_of_row).astype(np.float64))}
    out = {"file": str(path), "pairs": int(len(diff)), "users": int(len(by_user)), "dim": int(diff.shape[1])}
    for kind, (squares, counts) in devices.items():
        median, ratio = scales(squares, counts)
        row = {"scale_min": float(median.min()), "scale_max": float(median.max()), "ratio_max": float(ratio.max())}
        for name, (low, high) in BANDS.items():
            row[name] = int(((median < low) | (median > high) | (ratio > high)).sum())
        out[kind] = row
    return out


def table(rows: list[dict], about: str) -> str:
    lines = ["# A deployment node's own scale check on usual files (`python -m simulations.bench_device_scale`)", "",
             "Each device is one pair or one user's pairs of the file. `scale` is the median coordinate's rms times "
             "sqrt(D); `ratio` a coordinate's over it. Refused: how many devices a band would refuse (all false "
             f"refusals: these files are at the usual scale). simulate's band is {USUAL_DIFF_RMS}, a node's "
             f"{DEVICE_DIFF_RMS} (the upper bound also caps the ratio). {about}", "",
             "| file | devices | count | scale min .. max | ratio max | refused, simulate's band | refused, a node's |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for kind in ("one pair", "one user"):
            m = row[kind]
            lines.append(f"| {row['file']} | {kind} | {row['pairs'] if kind == 'one pair' else row['users']} | "
                         f"{m['scale_min']:.3g} .. {m['scale_max']:.3g} | {m['ratio_max']:.3g} | "
                         f"{m['simulate (USUAL_DIFF_RMS)']} | {m['device (DEVICE_DIFF_RMS)']} |")
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
