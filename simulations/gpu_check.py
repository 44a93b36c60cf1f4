"""One-shot GPU check: the centralized trainer and record-mode DP-SGD on CUDA against the CPU.

    python -m simulations.gpu_check [--out DIR]

Prints JSON: per device the training time and accuracies on the lore_core benchmark file (D = 384) and on a
wide file (D = 4096, like reward-model embeddings), and record-mode figures. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lore_core.evaluation import evaluate_model
from lore_core.joint_trainer import TrainConfig, train_joint
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs


def trainer_figures(config: SyntheticPairsConfig, rank, device: str) -> dict:
    pairs, _ = make_synthetic_pairs(config)
    train = pairs.select(seen=True, split="train")
    started = time.perf_counter()
    fit = train_joint(train.diff, train.user, TrainConfig(rank=rank, device=device))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    metrics = evaluate_model(pairs, fit.basis, joint_weights=(fit.user_ids, fit.user_weights))
    return {"device": device, "dim": config.dim, "users": config.seen_users, "rank": fit.rank, "seconds": seconds,
            "seen_test_acc": metrics["seen_test_acc"], "unseen_test_acc": metrics["unseen_test_acc"]}


def record_figures(device: str) -> dict:
    from lore_core.privacy.record_dp import RecordDpState, dp_sgd_update, record_epsilon

    rng = np.random.default_rng(0)
    basis = rng.standard_normal((10, 384)).astype(np.float32) / 20
    logits = np.log(rng.dirichlet(np.ones(10)))
    diff = rng.standard_normal((40, 384)).astype(np.float32) / 20
    state = RecordDpState()
    started = time.perf_counter()
    for _ in range(10):
        delta, logits, state = dp_sgd_update(basis, logits, diff, noise_multiplier=1.0, max_grad_norm=1.0,
                                             batch_size=8, sample_rate=0.25, epochs=5, lr=0.1, state=state,
                                             device=device)
    return {"device": device, "seconds_10_rounds": time.perf_counter() - started,
            "epsilon_after_10_rounds": record_epsilon(state, 1e-5), "update_finite": bool(np.isfinite(delta).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "trainer": [], "record": []}
    for cfg, rank in ((SyntheticPairsConfig(), "auto"),
                      (SyntheticPairsConfig(dim=4096, seen_users=1400, unseen_users=100, seed=1), 5)):
        for device in ("cpu", "cuda"):
            row = trainer_figures(cfg, rank, device)
            results["trainer"].append(row)
            print(json.dumps(row), flush=True)
    for device in ("cpu", "cuda"):
        row = record_figures(device)
        results["record"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
