"""Server step on the basis from the aggregated user update (FedOpt: Reddi et al., ICLR 2021).

The clients' mean update is turned into a pseudo-gradient of the centralized objective,
    g = -mean_dA / (client_lr * local_steps) + 2 * l2 * A        (exact gradient when local_steps = 1),
so the l2 term on A is applied once, by the server, as in `lore-fed train`; then SGD or Adam steps on A (B, D).

Given the run's planned rounds T, the learning rate follows a cosine from the base rate to 0 over T steps, and the
reported basis is the running mean of the bases released in the last quarter of the steps (tail averaging): with a
sample of the users per round (DP's 50, or a smaller --clients-per-round) the last iterate moves with the sample, the
average does not. Both only post-process what was already released, so under DP they cost no privacy. Without T
(tests, old callers) the rate is constant and the reported basis is the last iterate.
State is a dict of arrays so that it goes into the checkpoint as is.
"""

from __future__ import annotations

import math

import numpy as np

# Base rates: without DP chosen on the pilot populations (`python -m simulations.choose_federated_defaults`,
# bench_results/federated_pilot.md; 0.3 was tried for lore-fed 0.2.1's one pair-weighted step and kept out:
# `simulations.pilot_federated_server_lr`, bench_results/federated_server_lr_pilot.md); under user-level
# DP the rate screened on the public DP pilot (`simulations.sweep_privacy_configs --screen`), where each step carries
# noise that a larger rate would amplify.
DEFAULT_SERVER_LR = {"none": 1.0, "dp": 0.05}
# The rate's schedule and the initial basis scale: without DP chosen on the matrix's pilots (as the rate); under DP
# on the DP pilot (`python -m simulations.choose_dp_defaults`, bench_results/dp_defaults_pilot.md).
DEFAULT_SCHEDULE = {"none": "cosine", "dp": "constant"}
DEFAULT_INIT_SCALE = {"none": 5.0, "dp": 1.0}
SCHEDULES = ("cosine", "constant")
AVERAGE_FROM = 0.75  # share of the planned rounds after which released bases enter the reported average


def _kind(privacy_mode: str) -> str:
    return "none" if privacy_mode == "none" else "dp"


def default_server_lr(privacy_mode: str) -> float:
    return DEFAULT_SERVER_LR[_kind(privacy_mode)]


def default_schedule(privacy_mode: str) -> str:
    return DEFAULT_SCHEDULE[_kind(privacy_mode)]


def default_init_scale(privacy_mode: str) -> float:
    return DEFAULT_INIT_SCALE[_kind(privacy_mode)]


class _ServerOptimizer:
    name = ""

    def __init__(self, lr: float, total_rounds: int | None = None, schedule: str = "cosine") -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"server lr schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.base_lr, self.total_rounds, self.schedule = lr, total_rounds, schedule
        self.t = 0  # steps taken
        self.average: np.ndarray | None = None
        self.averaged = 0

    @property
    def lr(self) -> float:
        """The rate of the next step (cosine over the planned rounds, or constant)."""
        if not self.total_rounds or self.schedule == "constant":
            return self.base_lr
        progress = min(self.t, self.total_rounds) / self.total_rounds
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step(self, basis: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """The next basis. A step that overflows, in the basis or in the optimizer's state, returns NaN everywhere
        and leaves the optimizer as it was (the caller skips it): Adam's moments would otherwise keep the inf, and
        every later step would be skipped, or move nothing (an infinite v with a finite basis: m / inf = 0)."""
        before = dict(vars(self))  # every update below rebinds its arrays, so a shallow copy restores them
        with np.errstate(over="ignore", invalid="ignore"):
            new_basis = self._update(basis, grad, self.lr)
        state = [value for value in vars(self).values() if isinstance(value, np.ndarray)]
        if not all(np.isfinite(array).all() for array in [new_basis, *state]):
            vars(self).update(before)
            return np.full_like(new_basis, np.nan)
        self.t += 1
        if self.total_rounds and self.t > AVERAGE_FROM * self.total_rounds:
            self.averaged += 1
            self.average = new_basis.copy() if self.average is None else \
                self.average + (new_basis - self.average) / self.averaged
        return new_basis

    def reported(self, basis: np.ndarray) -> np.ndarray:
        """The basis the run reports: the tail average once it exists, else the current basis (B, D)."""
        return reported_basis(self.state_dict(), basis)

    def _update(self, basis: np.ndarray, grad: np.ndarray, lr: float) -> np.ndarray:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"t": np.array(self.t)}
        if self.average is not None:
            state.update(average=self.average, averaged=np.array(self.averaged))
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            self.t = int(state["t"])
            if "average" in state:
                self.average, self.averaged = state["average"].copy(), int(state["averaged"])


class ServerSGD(_ServerOptimizer):
    name = "sgd"

    def _update(self, basis: np.ndarray, grad: np.ndarray, lr: float) -> np.ndarray:
        return basis - lr * grad


class ServerAdam(_ServerOptimizer):
    name = "adam"

    def __init__(self, lr: float, total_rounds: int | None = None, schedule: str = "cosine", beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(lr, total_rounds, schedule)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def _update(self, basis: np.ndarray, grad: np.ndarray, lr: float) -> np.ndarray:
        if self.m is None:
            self.m, self.v = np.zeros_like(basis), np.zeros_like(basis)
        t = self.t + 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * grad
        self.v = self.beta2 * self.v + (1 - self.beta2) * grad**2
        m_hat = self.m / (1 - self.beta1**t)
        v_hat = self.v / (1 - self.beta2**t)
        return basis - lr * m_hat / (np.sqrt(v_hat) + self.eps)

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.m is None:
            return {}
        return {**super().state_dict(), "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        super().load_state_dict(state)
        if state:
            self.m, self.v = state["m"].copy(), state["v"].copy()


def reported_basis(state: dict[str, np.ndarray], basis: np.ndarray) -> np.ndarray:
    """The reported basis from an optimizer's saved state (a checkpoint's) and the current basis (B, D)."""
    return state.get("average", basis)


def make_optimizer(name: str, lr: float, total_rounds: int | None = None,
                   schedule: str = "cosine") -> ServerSGD | ServerAdam:
    return {"sgd": ServerSGD, "adam": ServerAdam}[name](lr, total_rounds, schedule)


def pseudo_gradient(basis: np.ndarray, mean_update: np.ndarray, *, client_lr: float, local_steps: int,
                    l2: float) -> np.ndarray:
    return -mean_update / (client_lr * local_steps) + 2.0 * l2 * basis
