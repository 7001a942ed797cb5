"""The `gptneo` command line. Modules here import typer and rich, never torch at load."""
