"""Alias of the `lore-fed` command line from before the restructuring (`python -m simulations.cli ...`): it lives in
`lore_cli.main` now."""

from lore_cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
