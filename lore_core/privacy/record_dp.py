"""Record-level DP-SGD on one user's weights and basis together, with Opacus (`record` mode, a literature baseline;
docs/privacy.md §5).

w must be inside the private computation: a w fitted without privacy on the same pairs makes every clipped gradient
depend on every pair (removing one pair moved the released update by 3.6 times the clip norm), and the guarantee
is void. So the model is z = softmax(theta) . A d with both the user's logits theta (B,) and the basis A (B, D)
(`nn.Linear(D, B, bias=False)`) trainable, and Opacus clips each pair's gradient over (theta, A) together to
max_grad_norm and adds noise to both. theta, a DP-SGD output itself, stays on the device (the caller stores it);
the update dA is what leaves. With w inside, one step's sum of clipped gradients changes by at most max_grad_norm
when one pair is removed, and every step is accounted.
The accountant history lives in `RecordDpState`, which the caller stores (Flower `Context.state` and disk) and
passes back next round: it is loaded into every new PrivacyEngine and never reset (Flower's Opacus example
re-creates it each round and under-reports epsilon ~9x).
Guarantee: per client, per pair; NOT user-level.
"""

from __future__ import annotations

import math
import numbers
import secrets
import warnings
from dataclasses import dataclass, field

import numpy as np

from lore_core.privacy.accounting import PrivacyBudgetExhausted, check_history, history_epsilon

Segment = tuple[float, float, int]


@dataclass
class RecordDpState:
    """One client's accountant history: (noise_multiplier, sample_rate, steps) segments, as Opacus stores it."""

    history: list[Segment] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def extends(self, before: "RecordDpState") -> bool:
        """Whether this history holds every step of `before` first (Opacus extends the last segment when z and q
        repeat). Epsilon only grows along an extension."""
        old, n = [tuple(s) for s in before.history], len(before.history)
        mine = [tuple(s) for s in self.history]
        if n == 0:
            return True
        if len(mine) < n or mine[:n - 1] != old[:n - 1]:
            return False
        return mine[n - 1][:2] == old[-1][:2] and mine[n - 1][2] >= old[-1][2]

    def spent_since(self, before: "RecordDpState") -> list[Segment]:
        """The segments added to this history since `before`, which it extends: what a client reports to the
        server's ledger."""
        if not self.extends(before):
            raise ValueError(f"accountant history {self.history} does not extend {before.history}")
        n = len(before.history)
        if n == 0:
            return list(self.history)
        z, q, k = self.history[n - 1]
        gained = k - before.history[-1][2]
        return ([(z, q, gained)] if gained else []) + list(self.history[n:])

    def to_dict(self) -> dict[str, list]:
        """Plain lists of numbers: fits a Flower ConfigRecord and JSON."""
        return {
            "noise_multiplier": [float(z) for z, _, _ in self.history],
            "sample_rate": [float(q) for _, q, _ in self.history],
            "steps": [int(k) for _, _, k in self.history],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "RecordDpState":
        lengths = {len(data.get(k, ())) for k in ("noise_multiplier", "sample_rate", "steps")}
        if len(lengths) != 1:
            raise ValueError(f"record-DP state needs equally long noise_multiplier/sample_rate/steps lists; got {data}")
        segments = zip(data["noise_multiplier"], data["sample_rate"], data["steps"])
        return cls(history=[tuple(s) for s in check_history(segments)])


def starting_history(own: RecordDpState, ledger: RecordDpState | None) -> RecordDpState:
    """The history a user's next DP-SGD step continues: its own, or the server ledger's where that extends it (a
    node that lost its state holds an empty one). Never a history that drops any of its own steps, so a server can
    make a user stop earlier this way, never spend more (a longer history of cheap steps is not an extension)."""
    return ledger if ledger is not None and ledger.extends(own) else own


def spending_to_report(after: RecordDpState, start: RecordDpState, ledger: RecordDpState | None) -> list[Segment]:
    """What a client reports to the ledger: every step the ledger lacks where `after` extends the ledger's history
    (a reply the ledger never recorded, late or rejected, is caught up on), else the steps since `start`."""
    return after.spent_since(ledger if ledger is not None and after.extends(ledger) else start)


def record_epsilon(state: RecordDpState, delta: float, accountant: str = "prv") -> float:
    """This client's per-pair epsilon after all its rounds so far."""
    return history_epsilon(state.history, delta, accountant)


def _joint_scorer(basis: np.ndarray, logits: np.ndarray, device):
    """torch module: pair logit z = softmax(theta) . (A d); A = nn.Linear(D, B) and theta (B,) both trainable, so
    Opacus clips and noises the gradient over both."""
    import torch
    from torch import nn

    class JointScorer(nn.Module):
        def __init__(self):
            super().__init__()
            self.basis = nn.Linear(basis.shape[1], basis.shape[0], bias=False)
            with torch.no_grad():
                self.basis.weight.copy_(torch.as_tensor(basis, dtype=torch.float32))
            self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32).clone())

        def forward(self, diff):  # (b, D) -> (b,)
            return self.basis(diff) @ torch.softmax(self.logits, dim=0)

    return JointScorer().to(device)


# The most DP-SGD steps a round may ask of a client (epochs x int(1 / q)): a server's rate of 1e-9 made the budget
# check alone take minutes and the steps 1e9 (a reviewer); the federated modes' local steps stop at the same.
MAX_RECORD_STEPS = 10_000


def steps_per_epoch(sample_rate: float) -> int:
    """The DP-SGD steps of one epoch at Poisson rate q: int(1 / q), as Opacus' sampler takes them. Public, as q is."""
    ok = isinstance(sample_rate, numbers.Real) and not isinstance(sample_rate, bool) and math.isfinite(sample_rate)
    if not (ok and 0 < sample_rate <= 1):
        raise ValueError(f"the record sample rate must be in (0, 1]; got {sample_rate!r}")
    if sample_rate < 1 / MAX_RECORD_STEPS:  # also keeps 1 / q finite
        raise ValueError(f"the record sample rate {sample_rate!r} is below 1 / {MAX_RECORD_STEPS:,}: an epoch would "
                         f"take more than {MAX_RECORD_STEPS:,} steps")
    return int(1 / float(sample_rate))


def check_request(noise_multiplier, max_grad_norm, batch_size, sample_rate, epochs) -> int:
    """The steps per epoch of a record update with these public settings, or ValueError naming the first that is
    not usable. A node checks a server's request with it before any user trains, so that whether it refuses never
    depends on which of its users hold pairs."""
    for name, value in (("noise multiplier", noise_multiplier), ("max-grad-norm", max_grad_norm)):
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0; got {value!r}")
    for name, value in (("record-batch-size", batch_size), ("record-epochs", epochs)):
        if isinstance(value, bool) or not (isinstance(value, numbers.Integral) and value > 0):
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    steps = steps_per_epoch(sample_rate)
    if epochs * steps > MAX_RECORD_STEPS:
        raise ValueError(f"record-epochs x int(1 / record-sample-rate) = {epochs} x {steps} steps is above "
                         f"{MAX_RECORD_STEPS:,} per round")
    return steps


def _resolve_device(device: str):
    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device {device!r} requested but CUDA is not available; using cpu", RuntimeWarning, stacklevel=3)
        return torch.device("cpu")
    return torch.device(device)


def dp_sgd_update(
    basis: np.ndarray,
    logits: np.ndarray,
    diff: np.ndarray,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    batch_size: int,
    sample_rate: float,
    epochs: int,
    lr: float,
    state: RecordDpState,
    device: str = "cpu",
    delta: float | None = None,
    max_epsilon: float | None = None,
    reproducible_seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray, RecordDpState]:
    """`epochs` epochs of Opacus DP-SGD on the user's logits and the basis -> (delta_basis (B, D), new logits (B,),
    new_state).

    basis (B, D), logits (B,) the user's private weights as w = softmax(logits) (a DP-SGD output of earlier rounds,
    or zeros: uniform), diff (n, D) this client's pair differences (chosen - rejected).
    Loss per pair softplus(-w.A d). Each pair joins a step's Poisson batch with the public rate `sample_rate`; an
    epoch is steps_per_epoch(rate) steps, and each step moves (theta, A) by -lr (sum of clipped grads + noise) /
    batch_size, the clip over both. A client without pairs takes the same steps on empty batches (noise only).
    Nothing of the mechanism follows n: Opacus' make_private derives the rate (1 / batches) and the divisor
    (rate x n) from the data, so removing one pair changed the released update's noise scale, and a server told n
    from n - 1 (a privacy reviewer: an epsilon of 4 certified against a claimed 0.47).
    With delta, warns on the device when delta >= 1/n; with max_epsilon (needs delta), raises PrivacyBudgetExhausted
    before any step if this update would exceed it. RNGs are seeded from `secrets` unless a reproducible_seed is
    given (debug, not private).
    """
    import torch
    from opacus import GradSampleModule
    from opacus.accountants import PRVAccountant
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer
    from torch.utils.data import TensorDataset

    basis, logits, diff = np.asarray(basis), np.asarray(logits), np.asarray(diff)
    if basis.ndim != 2 or logits.shape != (basis.shape[0],) or diff.ndim != 2 or diff.shape[1] != basis.shape[1]:
        raise ValueError(f"need basis (B, D), logits (B,), diff (n, D); got {basis.shape}, {logits.shape}, "
                         f"{diff.shape}")
    n = diff.shape[0]
    steps = check_request(noise_multiplier, max_grad_norm, batch_size, sample_rate, epochs)
    if delta is not None and not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    if delta is not None and n and delta >= 1 / n:  # a weak guarantee, said on the device only: a refusal told the
        warnings.warn(f"delta {delta} >= 1/n = {1 / n:.3g} for this client's {n} pairs: a weak guarantee "  # server
                      f"(set the node's record-delta lower)", RuntimeWarning, stacklevel=2)  # n by bisection
    if max_epsilon is not None and delta is None:
        raise ValueError("max_epsilon needs delta")
    if max_epsilon is not None and not (math.isfinite(max_epsilon) and max_epsilon > 0):
        raise ValueError(f"max_epsilon must be finite and > 0; got {max_epsilon}")  # NaN compared False: no budget
    if sample_rate == 1:
        warnings.warn("record sample rate 1: every step sees every pair, no amplification by sampling",
                      RuntimeWarning, stacklevel=2)

    device = _resolve_device(device)
    seeds = (reproducible_seed, reproducible_seed + 1) if reproducible_seed is not None else (
        secrets.randbits(63), secrets.randbits(63))
    sampling_rng = torch.Generator().manual_seed(seeds[0])  # Poisson batches (the sampler runs on cpu)
    noise_rng = torch.Generator(device=device).manual_seed(seeds[1])

    model = GradSampleModule(_joint_scorer(basis, logits, device), batch_first=True, loss_reduction="mean")
    model.forbid_grad_accumulation()  # Poisson batches: each step's per-pair gradients alone
    # What make_private assembles, with the rate and the divisor public instead of derived from n.
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=float(noise_multiplier),
                            max_grad_norm=float(max_grad_norm), expected_batch_size=int(batch_size),
                            loss_reduction="mean", generator=noise_rng)
    accountant = PRVAccountant()
    accountant.history = list(state.history)  # continue, never reset, this client's accounting
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=float(sample_rate)))
    if n:
        loader = DPDataLoader(TensorDataset(torch.as_tensor(diff, dtype=torch.float32)),
                              sample_rate=float(sample_rate), generator=sampling_rng)
        assert len(loader) == steps, (len(loader), steps)  # the ledger's planning counts Opacus' steps
    else:  # a user without pairs takes the same noise-only steps: one pair's presence must not show (a reviewer)
        loader = [(torch.zeros((0, diff.shape[1])),)] * steps
    planned = check_history(state.history + [(float(noise_multiplier), float(sample_rate), epochs * steps)])
    if max_epsilon is not None and not (eps := history_epsilon(planned, delta)) <= max_epsilon:  # NaN stops too
        raise PrivacyBudgetExhausted(f"this update would bring the client's record-level epsilon to {eps:.3f} > "
                                     f"max_epsilon {max_epsilon}; skip training on this client")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(int(epochs)):
            for (batch,) in loader:
                optimizer.zero_grad()
                # An empty Poisson batch still takes a (pure-noise) step and is accounted, as it must be.
                # mean over the batch drawn: the module multiplies it back to per-pair gradients, and the optimizer
                # divides their clipped sum (+ noise) by the public batch_size
                loss = torch.nn.functional.softplus(-model(batch.to(device))).mean()
                loss.backward()
                optimizer.step()
    new_basis = model._module.basis.weight.detach().cpu().numpy()
    new_logits = model._module.logits.detach().cpu().numpy().astype(np.float64)
    new_state = RecordDpState(history=[tuple(s) for s in check_history(accountant.history)])
    return (new_basis - basis.astype(np.float32)).astype(basis.dtype), new_logits, new_state
