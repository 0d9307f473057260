"""The `carbot` command line: the top layer, the one part of `carbot/` that may import the other packages.

Everything below it (`carbot`'s base modules, then `model`, `worker`, `training`
and `bots`) is imported only inside the command that needs it, so `carbot status`
answers without loading TensorFlow.
"""

from carbot.cli._commands import main

__all__ = ["main"]
