"""`python -m gptneo_cli.cli` runs the same app as the `gptneo` console script."""

from .app import main

main()
