"""One module per ``pairfree`` subcommand: argument parsing and printing only."""
