"""`python -m carbot` is the `carbot` command."""

from carbot.cli import main

main()
