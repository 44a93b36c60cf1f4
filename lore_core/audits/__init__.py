"""Privacy audits of a lore-fed run (issue 5; design: docs/privacy.md §10-§11.2): measure what an attacker learns.

One module per audit, each returning a result dict with `verdict`, a one-line `summary`, its figures, CIs, method,
seed and number of trials; `report.write_audit` stores it under RUN_DIR/audits/ and in the run ledger. Inputs are
plain arrays (client updates, weights, pairs): the CLI (`lore-fed audit ...`) computes them with the client's code,
so this package stays numpy/scipy and never imports Flower or the client.
"""
