"""Benchmark of the on-device client: adaptation and ranking latency, peak memory, installed footprint.

    python -m simulations.bench_device [--encoder DIR] [--repeats 30] [--json OUT]

Prints: few-shot fit latency (median, p95) by number of pairs (B = 10, D = 384), the same with the pairs' encoding;
`next-question` on a 200-pair pool (posterior samples and the choice, in-process, after 0, 10 and 30 answers; and
`adapt` with its posterior update);
ranking latency for 4 and 16 candidates including encoding (warm, in-process); cold `rank` command wall time and
peak RSS of the device process (onnxruntime) against the torch path (transformers embedder); installed size of the
device dependencies against torch + transformers. Without --encoder the ONNX encoder is exported first (~30 s).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PAIR_COUNTS = (5, 10, 20, 50)
POOL_PAIRS = 200
ANSWER_COUNTS = (0, 10, 30)
CANDIDATE_COUNTS = (4, 16)
RANK = 10
DEVICE_PACKAGES = ("onnxruntime", "tokenizers", "numpy")
TORCH_PACKAGES = ("torch", "transformers", "numpy")

_TORCH_RANK = """
import json, sys, time
t = time.perf_counter()
import numpy as np
from lore_core.basis_file import load_basis
from lore_core.embeddings import SentenceEmbedder
basis = load_basis(sys.argv[1]).basis
cands = json.load(open(sys.argv[2]))
emb = SentenceEmbedder(use_cache=False).embed([[{"role": "user", "content": sys.argv[3]}]] * len(cands), cands,
                                             progress=False)
print(np.argsort(-(emb @ basis.T @ np.full(len(basis), 1 / len(basis)))))
"""


def percentiles(seconds: list[float]) -> dict:
    ms = 1e3 * np.asarray(seconds)
    return {"median_ms": round(float(np.median(ms)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def bench_fit(repeats: int) -> dict:
    from client.device.personalize import adapt
    from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

    out = {}
    for n in PAIR_COUNTS:
        pairs, truth = make_synthetic_pairs(SyntheticPairsConfig(
            dim=384, true_rank=RANK, seen_users=0, unseen_users=repeats, few_shot_pairs=n, test_pairs=1, seed=n))
        _, idx = pairs.user_index()
        train = pairs.split == "train"
        times, iterations = [], []
        for u in range(repeats):
            diff = pairs.diff[train & (idx == u)]
            start = time.perf_counter()
            result = adapt(truth.basis, diff)
            times.append(time.perf_counter() - start)
            iterations.append(result.iterations)
        out[n] = {**percentiles(times), "median_iterations": int(np.median(iterations))}
    # Incremental: one new choice on top of 20, warm-started from the previous w.
    diff = pairs.diff[train & (idx == 0)][:21]
    w20 = adapt(truth.basis, diff[:20]).user_weights
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        adapt(truth.basis, diff, init=w20)
        times.append(time.perf_counter() - start)
    out["incremental_20_plus_1"] = percentiles(times)
    return out


def bench_next_question(repeats: int) -> dict:
    """next-question's work after the pool is read: answered pairs, posterior samples, the most informative pair
    (B = 10, D = 384, 200-pair pool); and adapt's refit with the posterior. Same code as the command."""
    from client.device import user_posterior
    from client.device.pool import Pool, answered
    from client.device.state import new_state
    from lore_core.basis_file import BasisFile
    from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

    pairs, truth = make_synthetic_pairs(SyntheticPairsConfig(
        dim=384, true_rank=RANK, seen_users=0, unseen_users=1, few_shot_pairs=POOL_PAIRS + max(ANSWER_COUNTS),
        test_pairs=1, seed=7))
    diff = pairs.diff[pairs.split == "train"]
    basis = BasisFile(basis=truth.basis.astype(np.float32), version=0, embedder="bench", sha256="")
    pool = Pool(records=None, diff=diff[:POOL_PAIRS].astype(np.float64))
    out = {}
    for n in ANSWER_COUNTS:
        state, _ = user_posterior.refit(replace(new_state("unused", basis), pair_diff=diff[POOL_PAIRS:POOL_PAIRS + n]))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            available = ~answered(pool, state.choices, state.pair_diff)
            user_posterior.next_questions(state, pool.diff, available, 1)
            times.append(time.perf_counter() - start)
        refits = []
        for _ in range(repeats if n else 0):
            start = time.perf_counter()
            user_posterior.refit(state)
            refits.append(time.perf_counter() - start)
        out[f"{n}_answers"] = {"next_question": percentiles(times),
                               "adapt_with_posterior": percentiles(refits) if refits else None}
    return out


def bench_encoder(encoder_dir: Path, repeats: int) -> dict:
    from client.device.encoder import OnnxPairEncoder
    from client.device.personalize import adapt
    from client.device.ranking import candidate_rewards, rank_order
    from lore_core.embeddings import render_context
    from simulations.text_pool import build_text_pool

    pool = build_text_pool(seed=0)
    start = time.perf_counter()
    encoder = OnnxPairEncoder(encoder_dir)
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((RANK, encoder.dim)).astype(np.float32)
    weights = rng.dirichlet(np.ones(RANK))
    out = {"encoder_load_ms": round(1e3 * load_s, 1), "adapt_with_encoding": {}, "rank": {}}
    for n in PAIR_COUNTS:
        times = []
        for r in range(max(3, repeats // 5)):
            ex = [pool.openers[(r * n + i) % len(pool.openers)] for i in range(n)]
            ctx = [render_context([{"role": "user", "content": e.prompt}]) for e in ex]
            start = time.perf_counter()
            emb = encoder.embed(ctx + ctx, [e.candidates[0] for e in ex] + [e.candidates[3] for e in ex])
            adapt(basis, emb[:n] - emb[n:])
            times.append(time.perf_counter() - start)
        out["adapt_with_encoding"][n] = percentiles(times)
    for k in CANDIDATE_COUNTS:
        times = []
        for r in range(repeats):
            ex = pool.openers[r % len(pool.openers)]
            candidates = [pool.openers[(r + j) % len(pool.openers)].candidates[j % 4] for j in range(k)]
            start = time.perf_counter()
            emb = encoder.embed([render_context([{"role": "user", "content": ex.prompt}])] * k, candidates)
            rank_order(candidate_rewards(basis, weights, emb))
            times.append(time.perf_counter() - start)
        out["rank"][k] = percentiles(times)
    return out


# Peak RSS from the process's own VmHWM (ru_maxrss of a child also counts the parent's pages before exec).
_MEASURE = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print('VmHWM_kB', next(l.split()[1] for l in open('/proc/self/status') "
    "if l.startswith('VmHWM')), file=sys.stderr))\n"
    "kind, target = sys.argv[1:3]; sys.argv = [target] + sys.argv[3:]\n"
    "if kind == '-m': runpy.run_module(target, run_name='__main__', alter_sys=True)\n"
    "else: exec(compile(target, '<bench>', 'exec'), {'__name__': '__main__'})\n"
)


def run_measured(kind: str, target: str, *args: str) -> dict:
    """Wall time and peak RSS (MiB) of `python -m target args` (kind "-m") or `python -c target args` ("-c")."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, kind, target, *args], env=env, cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{target[:40]} {args[:3]} failed: {proc.stderr[-800:]}")
    peak_kb = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("VmHWM_kB")))
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(peak_kb / 1024, 1)}


def bench_processes(encoder_dir: Path, work: Path) -> dict:
    from client.device.encoder import read_encoder_meta
    from lore_core.basis_file import UNKNOWN_EMBEDDER, save_basis
    from simulations.text_pool import build_text_pool

    pool = build_text_pool(seed=1)
    rng = np.random.default_rng(1)
    # The basis names the encoder's model: `init` refuses a basis trained on another model's embeddings.
    embedder = read_encoder_meta(encoder_dir).get("embedder") or UNKNOWN_EMBEDDER
    basis_path = save_basis(work / "basis.npz", rng.standard_normal((RANK, 384)), version=1, embedder=embedder)
    candidates = work / "candidates.json"
    candidates.write_text(json.dumps([pool.openers[j].candidates[j % 4] for j in range(16)]))
    choices = work / "choices.jsonl"
    choices.write_text("\n".join(json.dumps({"prompt": e.prompt, "chosen": e.candidates[0],
                                             "rejected": e.candidates[3]}) for e in pool.openers[:20]))
    state = ("--state", str(work / "state"))
    run_measured("-m", "client.device", *state, "init", "--basis", str(basis_path), "--encoder", str(encoder_dir))
    prompt = pool.openers[0].prompt
    return {
        "device_adapt_20_choices": run_measured("-m", "client.device", *state, "adapt", "--choices", str(choices)),
        "device_rank_16": run_measured("-m", "client.device", *state, "rank", "--prompt", prompt,
                                       "--candidates", str(candidates)),
        "torch_rank_16": run_measured("-c", _TORCH_RANK, str(basis_path), str(candidates), prompt),
    }


def installed_mib(packages: tuple[str, ...]) -> dict:
    sizes = {}
    for name in packages:
        dist = importlib.metadata.distribution(name)
        sizes[name] = round(sum(Path(dist.locate_file(f)).stat().st_size for f in dist.files or []
                                if Path(dist.locate_file(f)).is_file()) / 2**20, 1)
    sizes["total"] = round(sum(sizes.values()), 1)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", type=Path, help="an exported encoder directory (default: export one)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        encoder_dir = args.encoder
        if encoder_dir is None:
            from client.device.export import export_encoder

            encoder_dir = export_encoder(work / "encoder")
        report = {
            "machine": {"cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2),
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
            "fit_only": bench_fit(args.repeats),
            "next_question_200_pool": bench_next_question(args.repeats),
            "encoder": bench_encoder(encoder_dir, args.repeats),
            "processes": bench_processes(encoder_dir, work),
            "installed_mib": {"device": installed_mib(DEVICE_PACKAGES), "torch_path": installed_mib(TORCH_PACKAGES),
                              "onnx_model": round((encoder_dir / "model.onnx").stat().st_size / 2**20, 1)},
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
