"""What the conversation and the platform adapters exchange: who wrote, and what to answer.

The conversation (`bots._conversation`) never sees a Telegram `Update` or a
Discord `Interaction`; an adapter turns those into a `Sender` and calls the
conversation, then renders the `Reply` it gets back with its platform's widgets
(inline keyboards, Discord buttons, numbered choices in the terminal). A classification
keeps its structure (`Guesses`) in the reply: Telegram and the terminal show its text,
Discord builds an embed from its parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker import Candidate


@dataclass(frozen=True)
class Sender:
    """A person on a platform. `user_id` and `chat_id` are the platform's ids, as strings."""

    platform: str  # "telegram" | "discord" | "terminal"
    user_id: str
    chat_id: str
    language_code: str | None = None  # the client's language, e.g. "pt-BR"; English when unknown
    is_admin: bool = False  # set by the adapter from the admin-ids setting (terminal: always)


@dataclass(frozen=True)
class Photo:
    """A photo a person sent, as the adapter got it.

    `data` is what the classifier reads. Where a platform gives a smaller copy of a large photo
    (Discord's media proxy, Telegram's thumbnail of an image sent as a file), `data` is that copy
    and `original` the file as it was sent: the original is what the photo store keeps for
    retraining and what /forget names, and the copy saves the bot decoding megapixels the model
    never reads.
    """

    data: bytes
    original: bytes | None = None

    @property
    def kept(self) -> bytes:
        """The bytes the photo store keeps: the original where there is one."""
        return self.data if self.original is None else self.original


@dataclass(frozen=True)
class Button:
    text: str
    data: str  # opaque to the adapter; handed back to `Conversation.button` when pressed
    choice: bool = False  # one of a list of alternatives: a select menu where the platform has one


def is_admin(admin_ids: list[str], platform: str, user_id: str) -> bool:
    """Whether the admin-ids setting names this person ("telegram:123"; a bare id counts on every platform)."""
    return f"{platform}:{user_id}" in admin_ids or str(user_id) in admin_ids


@dataclass(frozen=True)
class Guesses:
    """A classification as a person reads it, in their language: a header, the candidates best first, a footer."""

    header: str
    candidates: tuple[Candidate, ...]
    footer: str

    def candidate_lines(self) -> list[str]:
        """One line per candidate: "1. FIAT ARGO — 91% ▰▰▰▰▰▰▰▰▰▱" (a label's line breaks become spaces)."""
        return [
            f"{rank}. {_one_line(candidate.label)} — {candidate.probability:.0%} {_bar(candidate.probability)}"
            for rank, candidate in enumerate(self.candidates, start=1)
        ]

    def as_text(self) -> str:
        """The plain-text rendering (Telegram, the terminal): the header, the candidates' lines, the footer."""
        return "\n".join([self.header, *self.candidate_lines(), self.footer])


def _one_line(label: str) -> str:
    return label.replace("\r", " ").replace("\n", " ")


def _bar(probability: float, width: int = 10) -> str:
    filled = round(probability * width)
    return "▰" * filled + "▱" * (width - filled)


@dataclass(frozen=True)
class Reply:
    """A message to send (or, for a button press, the new text of the message that holds the buttons)."""

    text: str
    buttons: tuple[tuple[Button, ...], ...] = ()  # rows of buttons
    prediction_id: int | None = None  # set when this reply is a classification: adapters record their message id
    photo_path: str | None = None  # an image to attach (e.g. a report picture), rarely used
    expects_text: bool = False  # the next plain text from this person answers this reply (a typed correction)
    progress_of: int | None = None  # set when this reply shows a retrain run's progress: adapters record its message
    guesses: Guesses | None = None  # set when this reply is a classification: `text` is `guesses.as_text()`


@dataclass(frozen=True)
class ButtonAnswer:
    """What a button press produces: a short notice for the presser and, maybe, a new version of the message."""

    notice: str  # Telegram's answerCallbackQuery text / Discord's ephemeral message
    edit: Reply | None = None  # replaces the message that holds the buttons
    follow_up: Reply | None = None  # a new message (e.g. "type the model's name")
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Notice:
    """A message the bot sends unprompted, to a chat: a retrain's progress (an edit) or its summary."""

    chat_id: str
    reply: Reply
    edit: str | None = None  # the adapter's reference of a message to edit instead of sending a new one
