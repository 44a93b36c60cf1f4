"""One module per `lore-fed` sub-command; each defines `configure(parser)` and `run(args) -> int`."""
