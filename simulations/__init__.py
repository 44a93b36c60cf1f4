"""simulations: population runs, benchmarks, reports and the `lore-fed` command line."""
