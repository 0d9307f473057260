"""The chat bots: one platform-agnostic conversation and thin adapters for Telegram, Discord and the terminal.

Nothing here imports TensorFlow: a bot process starts in about a second. The
adapters' libraries (python-telegram-bot, discord.py) are imported only by the
command that runs them.
"""

from __future__ import annotations

import importlib
from typing import Any

from bots._assembly import build_conversation, serving_redis
from bots._conversation import Conversation
from bots._messages import Button, ButtonAnswer, Guesses, Reply, Sender, is_admin
from bots._store import PredictionRecord, Store
from bots._terminal import chat, run_shell
from bots._texts import text

__all__ = [
    "Button",
    "ButtonAnswer",
    "Conversation",
    "Guesses",
    "PredictionRecord",
    "Reply",
    "Sender",
    "Store",
    "build_conversation",
    "chat",
    "is_admin",
    "run_discord",
    "run_shell",
    "run_telegram",
    "serving_redis",
    "text",
]

# Each platform's library is imported only when its bot runs.
_LAZY = {"run_telegram": "bots._telegram", "run_discord": "bots._discord"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
