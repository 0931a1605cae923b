"""Subcommands of `taskvec`: one module each, discovered by taskvec.cli."""
