"""The conversation in a terminal (`carbot shell`), like Rasa's `rasa shell`.

Type an image path and get the same answer a Telegram user gets. Buttons are
numbered: type the number to press one (`+` and `-` press 👍 and 👎 of the last
answer). Commands work as on the platforms, and the local user is an admin.
Standard input may be a pipe, so a script can hold a conversation. A retrain's
progress and summary are printed as they come, between the lines typed.
"""

from __future__ import annotations

import asyncio
import getpass
import locale
import os
import sys
from pathlib import Path
from typing import TextIO

from bots._assembly import build_conversation, serving_redis
from bots._conversation import Conversation
from bots._messages import Button, ButtonAnswer, Reply, Sender
from bots._retrain_desk import follow_retrains
from carbot.retrain_runs import RunEvent
from model import IMAGE_SUFFIXES

PROMPT = "you> "
QUIT = ("/quit", "/exit")


class TerminalChat:
    """Reads lines, talks to the conversation, prints its replies."""

    def __init__(self, conversation: Conversation, sender: Sender, output: TextIO) -> None:
        self.conversation = conversation
        self.sender = sender
        self.output = output
        self.buttons: list[Button] = []  # the numbered buttons of the last reply that had some
        self.expects_text = False

    async def handle(self, line: str) -> None:
        """One line typed by the person."""
        line = line.strip()
        if not line:
            return
        if line in ("+", "👍", "-", "👎") and self._vote_button(line in ("+", "👍")):
            await self._press(self._vote_button(line in ("+", "👍")))
        elif line.isdigit() and 1 <= int(line) <= len(self.buttons):
            await self._press(self.buttons[int(line) - 1])
        elif self.expects_text and not line.startswith("/"):
            self.expects_text = False
            await self._show(await self.conversation.text(self.sender, line))
        elif Path(line).expanduser().is_file():  # before commands: "/home/me/car.jpg" is a path
            await self._photo(Path(line).expanduser())
        elif line.startswith("/") and not _looks_like_path(line.split(" ", 1)[0]):
            await self._command(line)  # "/top3 ~/car.jpg": the command word decides, not its argument
        elif _looks_like_path(line):
            self._say(f"No such file: {line}")
        else:
            await self._show(await self.conversation.text(self.sender, line))

    async def _photo(self, path: Path) -> None:
        try:
            photo = path.read_bytes()
        except OSError as exc:
            self._say(f"Cannot read {path}: {exc.strerror}")
            return
        await self._show(await self.conversation.photo(self.sender, path.name, photo))

    async def _command(self, line: str) -> None:
        name, _, args = line[1:].partition(" ")
        if name == "top3" and args.strip():
            path = Path(args.strip()).expanduser()
            if not path.is_file():
                self._say(f"No such file: {args.strip()}")
                return
            await self._show(await self.conversation.top3(self.sender, path.name, path.read_bytes()))
            return
        await self._show(await self.conversation.command(self.sender, name, args.strip()))

    async def _press(self, button: Button) -> None:
        answer: ButtonAnswer = await self.conversation.button(self.sender, button.data)
        self._say(f"· {answer.notice}")
        if answer.edit is not None and answer.edit.text != answer.notice:
            await self._show(answer.edit)
        elif answer.edit is not None:
            self.buttons = list(_flatten(answer.edit.buttons))
        if answer.follow_up is not None:
            await self._show(answer.follow_up)

    async def notice(self, event: RunEvent) -> None:
        """A retrain event: its notices, printed (the terminal keeps no progress message to edit)."""
        if event.platform != self.sender.platform:
            return
        for notice in await self.conversation.retrain_notices(event):
            await self._show(notice.reply)

    async def _show(self, reply: Reply | None) -> None:
        if reply is None:
            return
        self._say(reply.text)
        if reply.photo_path:
            self._say(f"(picture: {reply.photo_path})")
        buttons = list(_flatten(reply.buttons))
        if buttons:
            self.buttons = buttons
            self._say("   ".join(f"[{number}] {button.text}" for number, button in enumerate(buttons, start=1)))
        self.expects_text = reply.expects_text

    def _vote_button(self, up: bool) -> Button | None:
        suffix = ":u" if up else ":d"
        return next((b for b in self.buttons if b.data.startswith("v:") and b.data.endswith(suffix)), None)

    def _say(self, message: str) -> None:
        print(message, file=self.output, flush=True)


async def chat(conversation: Conversation, lines: TextIO, output: TextIO, *, banner: str = "") -> None:
    """Hold a conversation over `lines` (a terminal or a pipe) until end of input or /quit."""
    sender = Sender(
        platform="terminal",
        user_id=getpass.getuser(),
        chat_id="terminal",
        language_code=os.environ.get("LANG") or locale.getlocale()[0],
        is_admin=True,
    )
    terminal = TerminalChat(conversation, sender, output)
    if banner:
        terminal._say(banner)
    following = None
    if conversation.retrain is not None:
        following = asyncio.create_task(follow_retrains(conversation.retrain, "terminal", terminal.notice))
    interactive = lines.isatty()
    loop = asyncio.get_running_loop()
    try:
        while True:
            if interactive:
                print(PROMPT, end="", file=output, flush=True)
            line = await loop.run_in_executor(None, lines.readline)
            if not line or line.strip() in QUIT:
                break
            await terminal.handle(line)
    finally:
        if following is not None:
            following.cancel()


def _flatten(rows: tuple[tuple[Button, ...], ...]):
    for row in rows:
        yield from row


def _looks_like_path(line: str) -> bool:
    return os.sep in line.lstrip("/") or Path(line).suffix.lower() in IMAGE_SUFFIXES


def run_shell(settings, *, lines: TextIO = sys.stdin, output: TextIO = sys.stdout, banner: str = "") -> None:
    """`carbot shell`: the conversation on the embedded defaults (private Redis, SQLite, a background worker)."""

    async def run(url: str) -> None:
        conversation = build_conversation(settings, url)
        try:
            await chat(conversation, lines, output, banner=banner)
        finally:
            await conversation.aclose()

    with serving_redis(settings, start_workers=True) as url:
        asyncio.run(run(url))
