"""Server-side run settings, parsed once from the flat run config (`[tool.flwr.app.config]` + overrides)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

PRIVACY_MODES = ("none", "user")
SERVER_OPTIMIZERS = ("adam", "sgd")


class RunConfigError(ValueError):
    """A run-config value that cannot work; says which key, what was expected and what came."""


@dataclass(frozen=True)
class ServerSettings:
    rounds: int
    rank: int
    clients_per_round: int
    seed: int
    eval_every: int
    local_steps: int
    client_lr: float
    server_optimizer: str
    server_lr: float
    l2: float
    prior_strength: float
    init_scale: float
    privacy_mode: str
    run_dir: str
    min_nodes: int
    round_timeout: float

    @classmethod
    def from_run_config(cls, cfg: dict) -> "ServerSettings":
        try:
            settings = cls(
                rounds=int(cfg["num-server-rounds"]),
                rank=int(cfg["rank"]),
                clients_per_round=int(cfg["clients-per-round"]),
                seed=int(cfg["seed"]),
                eval_every=int(cfg["eval-every"]),
                local_steps=int(cfg["local-steps"]),
                client_lr=float(cfg["client-lr"]),
                server_optimizer=str(cfg["server-optimizer"]),
                server_lr=float(cfg["server-lr"]),
                l2=float(cfg["l2"]),
                prior_strength=float(cfg["prior-strength"]),
                init_scale=float(cfg["init-scale"]),
                privacy_mode=str(cfg["privacy-mode"]),
                run_dir=str(cfg["run-dir"]),
                min_nodes=int(cfg["min-nodes"]),
                round_timeout=float(cfg["round-timeout"]),
            )
        except KeyError as exc:
            raise RunConfigError(f"run config lacks key {exc}; keys present: {sorted(cfg)}") from exc
        settings.validate()
        return settings

    def validate(self) -> None:
        positive = {"num-server-rounds": self.rounds, "rank": self.rank, "clients-per-round": self.clients_per_round,
                    "eval-every": self.eval_every, "local-steps": self.local_steps, "client-lr": self.client_lr,
                    "server-lr": self.server_lr, "prior-strength": self.prior_strength,
                    "init-scale": self.init_scale, "min-nodes": self.min_nodes, "round-timeout": self.round_timeout}
        for key, value in positive.items():
            if not value > 0:
                raise RunConfigError(f"run config `{key}` must be > 0, got {value}")
        if self.l2 < 0:
            raise RunConfigError(f"run config `l2` must be >= 0, got {self.l2}")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise RunConfigError(f"run config `server-optimizer` must be one of {SERVER_OPTIMIZERS}, "
                                 f"got {self.server_optimizer!r}")
        if self.privacy_mode not in PRIVACY_MODES:
            raise RunConfigError(f"run config `privacy-mode` must be one of {PRIVACY_MODES}, got {self.privacy_mode!r}")
        if not self.run_dir:
            raise RunConfigError("run config `run-dir` is empty: the server needs a directory for its checkpoints")

    def fingerprint(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint (timeouts may change)."""
        fields = asdict(self)
        for volatile in ("run_dir", "min_nodes", "round_timeout", "rounds"):
            fields.pop(volatile)
        return fields
