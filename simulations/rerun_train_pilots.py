"""Does a change to `lore-fed train` keep its choices and accuracy on the stress matrix's pilot cells?

    python -m simulations.rerun_train_pilots --work /work/matrix_work --before DIR [--runs DIR]
                                             [--out bench_results/train_pilot_rerun.md] [--populations A,B]

Reruns `lore-fed train` (default flags, the cell's seed) on each pilot cell (seeds >= 100) of a `bench_matrix` work
directory with the current code, and sets it beside the `train` row cached in `--before` (a copy of the work
directory's `results/` made before the change). A run already in `--runs` (its metrics.json) is reused, so an
interrupted comparison resumes. Pilot cells only: a change is judged where defaults are chosen, never on the
reported seeds 0-2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from simulations.bench_matrix import POPULATIONS, population_file, train_row, train_row_of

ROW_FILE = "row.json"  # this script's row of a finished rerun (wall seconds, like the cached rows)


def pilot_cells(before: Path, populations: set[str] | None = None) -> list[tuple[str, int]]:
    """(population, seed) of every pilot cell with a cached `train` row (of `populations`, when given)."""
    cells = []
    for pop in POPULATIONS:
        if populations is not None and pop.name not in populations:
            continue
        for path in sorted((before / pop.name).glob("seed*.json")):
            seed = int(path.stem.removeprefix("seed"))
            if seed >= 100 and "train" in json.loads(path.read_text()):
                cells.append((pop.name, seed))
    return cells


def rerun(pop_name: str, seed: int, work: Path, runs: Path) -> dict:
    """The current code's `train` row of one cell (reused from `runs` when that run finished). Its seconds are the
    command's wall time, as in the cached rows; a finished run without this script's row.json (made by hand) gives
    its training time only, and says so (`train_only`)."""
    run_dir = runs / pop_name / f"seed{seed}"
    if (run_dir / ROW_FILE).exists():
        return json.loads((run_dir / ROW_FILE).read_text())
    if (run_dir / "metrics.json").exists():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        return {**train_row_of(metrics, metrics["train_seconds"]), "train_only": True}
    pop = next(p for p in POPULATIONS if p.name == pop_name)
    path, _ = population_file(pop, seed, work, quick=False)
    row = train_row(path, run_dir, ["--seed", str(seed)])
    atomic_write_json(run_dir / ROW_FILE, row)
    return row


def _choice(row: dict) -> str:
    return f"rank {row['rank']} {row['objective']} l2 {row['l2']:.1e} prior {row['prior_pairs']:g}"


def _only(row: dict) -> str:
    return " (training only)" if row.get("train_only") else ""


def markdown(rows: list[dict]) -> str:
    lines = ["# `lore-fed train` rerun on the stress matrix's pilot cells", "",
             "Current code beside the `train` row cached before the change (seen / new test accuracy). Seconds: "
             "the whole `lore-fed train` command's wall time, except where marked (training only); measured at "
             "different times on a shared 2-core machine, so a rough guide only.", "",
             "| population | seed | before | now | choice before | choice now | seconds before | now |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, n = r["before"], r["now"]
        lines.append(f"| {r['population']} | {r['seed']} | {b['seen_test_acc']:.4f} / {b['unseen_test_acc']:.4f} | "
                     f"{n['seen_test_acc']:.4f} / {n['unseen_test_acc']:.4f} | {_choice(b)} | {_choice(n)} | "
                     f"{b['seconds']:.0f}{_only(b)} | {n['seconds']:.0f}{_only(n)} |")
    same = sum(_choice(r["before"]) == _choice(r["now"]) for r in rows)
    ratio = sorted(r["now"]["seconds"] / r["before"]["seconds"] for r in rows)
    lines += ["", f"Same choice on {same} of {len(rows)} cells; median time ratio now / before "
              f"{ratio[len(ratio) // 2]:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="the bench_matrix work directory (its pair files)")
    parser.add_argument("--before", required=True, help="a copy of WORK/results made before the change")
    parser.add_argument("--runs", default="runs/train_pilot_rerun", help="where the reruns go (reused if there)")
    parser.add_argument("--out", default="bench_results/train_pilot_rerun.md")
    parser.add_argument("--populations", default=None,
                        help="comma-separated population names (default: every population with a pilot cell)")
    args = parser.parse_args(argv)
    work, before, runs, out = Path(args.work), Path(args.before), Path(args.runs), Path(args.out)
    rows = []
    chosen = None if args.populations is None else set(args.populations.split(","))
    unknown = (chosen or set()) - {pop.name for pop in POPULATIONS}
    if unknown:
        parser.error(f"--populations: unknown {sorted(unknown)}; expected names from bench_matrix.POPULATIONS")
    for pop_name, seed in pilot_cells(before, chosen):
        cached = json.loads((before / pop_name / f"seed{seed}.json").read_text())["train"]
        rows.append({"population": pop_name, "seed": seed, "before": cached, "now": rerun(pop_name, seed, work, runs)})
        print(f"{pop_name} seed {seed}: before {_choice(cached)}, now {_choice(rows[-1]['now'])}", flush=True)
    atomic_write_json(out.with_suffix(".json"), rows)
    atomic_write_text(out, markdown(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
