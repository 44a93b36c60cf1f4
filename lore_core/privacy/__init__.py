"""Privacy core (no Flower): user-level DP-FedAvg, record-level DP-SGD, accounting, ledger (docs/privacy.md).

Server loop, user modes:  settings = validate(settings); ledger = PrivacyLedger.open(run_dir, settings);
rng = make_private_rng(settings.noise_seed if settings.reproducible_noise else None); each round:
ledger.check_next_round(); idx = poisson_sample(N, settings.sample_rate, rng); ...; mean = aggregate_user_dp(...);
ledger.record_round(t, len(idx)); only then release A + server_lr * mean.
"""

from lore_core.privacy.accounting import (
    AccountingError,
    EpsilonReport,
    PrivacyBudgetExhausted,
    epsilon,
    epsilon_report,
    history_epsilon,
    noise_for_target_epsilon,
    rounds_within_budget,
)
from lore_core.privacy.ledger import LedgerError, PrivacyLedger
from lore_core.privacy.dp_fedavg import (
    SecretRng,
    add_noise_to_sum,
    aggregate_user_dp,
    clip_updates,
    make_private_rng,
    noisy_sum,
    poisson_sample,
)
from lore_core.privacy.privacy_settings import PrivacyConfigError, PrivacySettings, validate

__all__ = [
    "AccountingError", "EpsilonReport", "PrivacyBudgetExhausted", "epsilon", "epsilon_report", "history_epsilon",
    "noise_for_target_epsilon", "rounds_within_budget", "LedgerError", "PrivacyLedger", "SecretRng",
    "add_noise_to_sum", "aggregate_user_dp", "clip_updates", "make_private_rng", "noisy_sum", "poisson_sample",
    "PrivacyConfigError", "PrivacySettings", "validate",
]
