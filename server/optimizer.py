"""Server step on the basis from the aggregated user update (FedOpt: Reddi et al., ICLR 2021).

The clients' mean update is turned into a pseudo-gradient of the centralized objective,
    g = -mean_dA / (client_lr * local_steps) + 2 * l2 * A        (exact gradient when local_steps = 1),
so the l2 term on A is applied once, by the server, as in `lore-fed train`; then SGD or Adam steps on A (B, D).
State is a dict of arrays so that it goes into the checkpoint as is.
"""

from __future__ import annotations

import numpy as np


class ServerSGD:
    name = "sgd"

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def step(self, basis: np.ndarray, grad: np.ndarray) -> np.ndarray:
        return basis - self.lr * grad

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        pass


class ServerAdam:
    name = "adam"

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None
        self.t = 0

    def step(self, basis: np.ndarray, grad: np.ndarray) -> np.ndarray:
        if self.m is None:
            self.m, self.v = np.zeros_like(basis), np.zeros_like(basis)
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * grad
        self.v = self.beta2 * self.v + (1 - self.beta2) * grad**2
        m_hat = self.m / (1 - self.beta1**self.t)
        v_hat = self.v / (1 - self.beta2**self.t)
        return basis - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.m is None:
            return {}
        return {"m": self.m, "v": self.v, "t": np.array(self.t)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            self.m, self.v, self.t = state["m"].copy(), state["v"].copy(), int(state["t"])


def make_optimizer(name: str, lr: float) -> ServerSGD | ServerAdam:
    return {"sgd": ServerSGD, "adam": ServerAdam}[name](lr)


def pseudo_gradient(basis: np.ndarray, mean_update: np.ndarray, *, client_lr: float, local_steps: int,
                    l2: float) -> np.ndarray:
    return -mean_update / (client_lr * local_steps) + 2.0 * l2 * basis
