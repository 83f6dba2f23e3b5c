"""One module per command: `add(sub)` declares its parser (its flags generated from its config where
it has one) and sets `run`, the handler `secateur.cli.main` calls."""
