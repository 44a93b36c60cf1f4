"""A new user's first questions, end to end, through the real device commands (the transcript in the README).

    python -m simulations.onboarding_demo [--dataset runs/onboarding/prism] [--questions 5] [--pool 40]
        [--out bench_results/onboarding_demo.txt]

The user is the first new (unseen) user of a prepared PRISM-shaped dataset; the pool is their own train pairs as
text, unlabeled; the basis is the dataset's calibrated basis (`bench_onboarding` writes it). The person is
simulated: they answer from the generator's hidden reward (ground_truth.npz: true basis, their true w, logit scale)
with Bradley-Terry noise (seed 0), on embeddings from the same ONNX encoder the device runs. Every other step is a
`python -m client.device` command in a fresh process; the transcript shows each command and what it printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_text
from lore_core.prism_schema import GROUND_TRUTH_FILE

REPO = Path(__file__).resolve().parents[1]


def device(state: Path, transcript: list[str], *args) -> str:
    """Run one device command, record it and its output; returns stdout."""
    argv = [sys.executable, "-m", "client.device", "--state", str(state), *map(str, args)]
    shown = "python -m client.device " + " ".join(shlex.quote(str(a)) for a in args)
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise RuntimeError(f"{shown} failed: {proc.stderr[-800:]}")
    transcript += [f"$ {shown}", "\n".join(_shortened(line) for line in proc.stdout.rstrip().splitlines())]
    return proc.stdout


def _shortened(line: str, width: int = 60) -> str:
    """A JSON output line with texts longer than `width` cut (marked with ...); other lines unchanged."""
    def cut(value):
        if isinstance(value, str) and len(value) > width:
            return value[: width - 3] + "..."
        if isinstance(value, list):
            return [cut(v) for v in value]
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    try:
        return json.dumps(cut(json.loads(line)), ensure_ascii=False)
    except json.JSONDecodeError:
        return line


def new_user(dataset: Path, pool_size: int) -> tuple[str, list[dict]]:
    """The first unseen user (by id) with at least pool_size train pairs, and that many of their pairs."""
    by_user: dict[str, list[dict]] = {}
    with open(dataset / "pairs.jsonl", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if not record["seen"] and record["split"] == "train":
                by_user.setdefault(record["user"], []).append(record)
    user = min(u for u, rows in by_user.items() if len(rows) >= pool_size)
    return user, by_user[user][:pool_size]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=REPO / "runs/onboarding/prism")
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--pool", type=int, default=40, help="pool pairs (the user's own train pairs)")
    parser.add_argument("--encoder", type=Path, help="exported encoder (default: export one, needs torch)")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results/onboarding_demo.txt")
    args = parser.parse_args(argv)
    basis = args.dataset / "train" / "basis_calibrated.npz"
    if not basis.is_file():
        print(f"onboarding_demo: error: {basis} is missing; run `python -m simulations.bench_onboarding` first",
              file=sys.stderr)
        return 2
    user, records = new_user(args.dataset, args.pool)
    order = random.Random(0)
    pool = [{"history": r["history"], "responses": order.sample([r["chosen"], r["rejected"]], 2)} for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        encoder = args.encoder
        if encoder is None:
            from client.device.export import export_encoder

            encoder = export_encoder(work / "encoder")
        answer_of = _simulated_person(args.dataset, user, encoder)
        (work / "pool.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pool))
        state = work / "state"
        transcript = [f"# new user {user} of {args.dataset.name}; pool: {len(pool)} of their pairs, unlabeled "
                      "(texts over 60 characters are cut with ... in this transcript)", ""]
        device(state, transcript, "init", "--basis", basis, "--encoder", encoder)
        device(state, transcript, "status")
        rng = np.random.default_rng(0)
        for number in range(1, args.questions + 1):
            transcript.append(f"\n# question {number}")
            asked = json.loads(device(state, transcript, "next-question", "--candidates", work / "pool.jsonl"))
            pair = pool[asked["questions"][0]["index"]]
            chosen = answer_of(pair, rng)
            answer = {"history": pair["history"], "chosen": pair["responses"][chosen],
                      "rejected": pair["responses"][1 - chosen]}
            (work / "answer.jsonl").write_text(json.dumps(answer) + "\n")
            picked = _shortened(json.dumps(pair["responses"][chosen]))
            transcript.append(f"# the person picks response {'AB'[chosen]}: {picked}")
            device(state, transcript, "adapt", "--choices", work / "answer.jsonl")
        transcript.append("")
        device(state, transcript, "status")
        shown = "\n".join(transcript).replace(str(work), "$WORK").replace(str(REPO) + "/", "") + "\n"
    atomic_write_text(args.out, shown)
    print(shown)
    return 0


def _simulated_person(dataset: Path, user: str, encoder_dir: Path):
    """answer(pair, rng) -> 0 or 1: a Bradley-Terry draw from the user's hidden reward (the generator's truth)."""
    from client.device.encoder import OnnxPairEncoder
    from lore_core.embeddings import render_context

    with np.load(dataset / GROUND_TRUTH_FILE, allow_pickle=False) as data:
        index = list(data["user_id"].astype(str)).index(user)
        head = float(data["logit_scale"]) * data["basis"].astype(np.float64).T @ data["user_weights"][index]
    encoder = OnnxPairEncoder(encoder_dir)

    def answer(pair: dict, rng) -> int:
        context = render_context(pair["history"])
        emb = encoder.embed([context, context], list(pair["responses"]))
        logit = float((emb[0] - emb[1]) @ head)
        return 0 if rng.random() < 1.0 / (1.0 + np.exp(-logit)) else 1

    return answer


if __name__ == "__main__":
    sys.exit(main())
