"""The Discord adapter: discord.py events in, `Conversation` calls out, embeds and components back.

What a person can do:

- send an image in a DM, or with a mention of the bot in a channel: each image is answered;
- `/top3 [photo]` (the last photo seen in the channel when none is attached), or the message
  context menu "Identify car" on any message that carries an image;
- press 👍/👎 under an answer, pick the right model in a select menu, or type it in a modal;
- `/help`, `/forget`, and for admins `/stats`, `/model`, `/retrain`, `/rollback` (hidden from
  members without the Administrator permission; the conversation refuses anyone not in the admin ids).

A retrain's progress is one channel message, edited each epoch, and its summary a new one
(`follow_retrains` runs beside the gateway connection; `deliver_notice` shows each notice).

Buttons and select menus are `DynamicItem`s: their state lives in the `custom_id`
(`carbot:<button data>`, `carbot-select:<key>` whose options' values are the button data),
so they keep working on old messages after the bot restarts. The typed-correction modal
carries its button's data too (`carbot-modal:<button data>`) and is answered by
`on_interaction`, so a form submitted after a restart is answered as well. Everything
the bot says comes from the conversation; this module only translates.

Discord gives a bot 3 seconds to acknowledge an interaction, and shows "This interaction
failed" otherwise. The database, Redis, the classifier and the retrain lock can each take
longer, so every interaction is acknowledged before any of them is touched: a command or
the context menu is deferred ("thinking…") and its answer replaces that message; a button
or menu press is deferred as an update, and its answer edits the message or follows it; a
modal, which can only be the first answer, opens at once and is checked when it comes
back. Whatever fails after that, the person is told (`answering`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import discord
from discord import MessageType, app_commands

from bots._assembly import build_conversation, serving_redis
from bots._conversation import Conversation, PhotoDownload
from bots._messages import Button, Guesses, Notice, Photo, Reply, Sender, is_admin
from bots._retrain_desk import follow_retrains
from carbot.retrain_runs import RunEvent
from carbot.settings import Settings
from model import IMAGE_SUFFIXES, REDUCE_ABOVE_INPUT_PIXELS, covering_size, upright_size

log = logging.getLogger(__name__)

PLATFORM = "discord"

# Discord's limits, all of them here (discord.py states none of them as constants).
MAX_CONTENT = 2000
MAX_EMBED_TITLE = 256
MAX_EMBED_DESCRIPTION = 4096
MAX_EMBED_FOOTER = 2048
MAX_BUTTON_LABEL = 80
MAX_OPTION_LABEL = 100
MAX_CUSTOM_ID = 100
MAX_OPTIONS = 25
MAX_BUTTONS_PER_ROW = 5
MAX_ROWS = 5
MAX_MODAL_TITLE = 45
# Feedback.correction holds up to 128 characters; nobody types a longer model name.
MAX_TYPED_MODEL = 128
# What a server without boosts lets a member upload.
MAX_UPLOAD_BYTES = 10 * 2**20
# How far a resized copy's aspect ratio may stray from the original's (the proxy rounds its sides to pixels).
COPY_ASPECT_TOLERANCE = 0.02


# -- the client ----------------------------------------------------------------------------------------------


class CarBot(discord.Client):
    """A `discord.Client` that knows its conversation and settings, and owns the slash-command tree."""

    def __init__(self, settings: Settings, conversation: Conversation) -> None:
        # Default intents: guild and DM messages. Discord sends a message's content and attachments to a
        # bot without the privileged message-content intent when it is a DM or mentions the bot: all we need.
        super().__init__(intents=discord.Intents.default(), allowed_mentions=discord.AllowedMentions.none())
        self.settings = settings
        self.conversation = conversation
        self.tree = app_commands.CommandTree(self)
        self.tree.error(on_command_error)
        self.retrain_follower: asyncio.Task | None = None

    async def setup_hook(self) -> None:
        # Persistent components: any message's buttons and select menus are dispatched here, even after a restart.
        self.add_dynamic_items(ConversationButton, ChoiceSelect)
        await sync_commands(self.tree, self.settings.discord_guild_id)
        if self.conversation.retrain is not None:
            following = follow_retrains(self.conversation.retrain, PLATFORM, self.on_retrain)
            self.retrain_follower = asyncio.create_task(following)

    async def close(self) -> None:
        if self.retrain_follower is not None:
            self.retrain_follower.cancel()
        await super().close()

    async def on_retrain(self, event: RunEvent) -> None:
        """A retrain event from the stream: show its notices to the admin who asked."""
        if event.platform != PLATFORM:
            return
        for notice in await self.conversation.retrain_notices(event):
            try:
                await deliver_notice(self, notice)
            except Exception:  # one undeliverable notice (a deleted channel, say) must not hold back the next
                log.exception("could not deliver a notice of retrain run %s", event.run_id)

    async def on_ready(self) -> None:
        log.info("Discord bot ready as %s in %d servers", self.user, len(self.guilds))

    async def on_message(self, message: discord.Message) -> None:
        await handle_message(self, message)

    async def on_interaction(self, interaction: discord.Interaction[CarBot]) -> None:
        # Every interaction passes here after discord.py dispatched it; only the correction modal is ours to answer.
        if interaction.type is discord.InteractionType.modal_submit:
            match = MODAL_ID.fullmatch(str((interaction.data or {}).get("custom_id", "")))
            if match is not None:
                await submit_correction(interaction, match["data"], typed_value(interaction.data.get("components")))


def build_bot(settings: Settings, conversation: Conversation) -> CarBot:
    """The Discord client with every command, context menu and event handler wired in."""
    bot = CarBot(settings, conversation)
    for command in (top3, help_command, forget, stats, model, retrain, rollback, identify_car):
        bot.tree.add_command(command)
    return bot


async def sync_commands(tree: app_commands.CommandTree, guild_id: int | None) -> None:
    """Publish the commands: to one server at once when `guild_id` is set, else globally (up to an hour)."""
    if guild_id:
        guild = discord.Object(id=guild_id)
        tree.copy_global_to(guild=guild)
        synced = await tree.sync(guild=guild)
        log.info("synced %d application commands to server %s", len(synced), guild_id)
    else:
        synced = await tree.sync()
        log.info("synced %d application commands globally", len(synced))


def sender_of(bot: CarBot, user: discord.abc.User, channel_id: int | None, locale: Any = None) -> Sender:
    """The conversation's view of a Discord user in a channel (`locale`: the interaction's, e.g. "pt-BR")."""
    user_id = str(user.id)
    return Sender(
        platform=PLATFORM,
        user_id=user_id,
        chat_id=str(channel_id),
        language_code=str(locale) if locale else None,
        is_admin=is_admin(bot.settings.admin_ids, PLATFORM, user_id),
    )


def interaction_sender(interaction: discord.Interaction[CarBot]) -> Sender:
    return sender_of(interaction.client, interaction.user, interaction.channel_id, interaction.locale)


# -- messages: images in DMs and mentions --------------------------------------------------------------------


async def handle_message(bot: CarBot, message: discord.Message) -> None:
    """A DM, or a channel message that mentions the bot: answer each image, or give a hint."""
    if message.author.bot or bot.user is None or message.type not in (MessageType.default, MessageType.reply):
        return
    mentioned = any(user.id == bot.user.id for user in message.mentions)
    if message.guild is not None and not mentioned:
        return
    sender = sender_of(bot, message.author, message.channel.id)
    images = [attachment for attachment in message.attachments if is_image(attachment)]
    for attachment in images:
        await answer_image(bot, message, sender, attachment)
    if images:
        return
    if message.attachments or message.stickers:
        kind = "sticker" if message.stickers and not message.attachments else hint_kind(message.attachments[0])
        await send_reply(message, bot.conversation.hint(sender, kind))
        return
    typed = strip_mentions(message.content, bot.user.id)
    reply = await bot.conversation.text(sender, typed) if typed else None
    await send_reply(message, reply or bot.conversation.hint(sender, "text"))


async def answer_image(bot: CarBot, message: discord.Message, sender: Sender, attachment: discord.Attachment) -> None:
    async with message.channel.typing():
        reply = await bot.conversation.photo(sender, str(message.id), download_of(bot, sender, attachment))
    sent = await send_reply(message, reply)
    if reply.prediction_id is not None:
        await bot.conversation.set_reply_message(reply.prediction_id, str(sent.id))


async def send_reply(message: discord.Message, reply: Reply) -> discord.Message:
    return await message.reply(**render(reply), mention_author=False)


# -- application commands ------------------------------------------------------------------------------------


@app_commands.command(name="top3", description="Name the car in a photo: my three best guesses.")
@app_commands.describe(photo="A photo of a car (without one, the last photo I saw in this channel)")
async def top3(interaction: discord.Interaction[CarBot], photo: discord.Attachment | None = None) -> None:
    conversation, sender = interaction.client.conversation, interaction_sender(interaction)
    if photo is not None and not is_image(photo):
        await interaction.response.send_message(**render(conversation.hint(sender, hint_kind(photo))), ephemeral=True)
        return
    async with answering(interaction):
        await interaction.response.defer(thinking=True)  # before the download, the classifier, the database
        download = download_of(interaction.client, sender, photo) if photo is not None else None
        reply = await conversation.top3(sender, None, download)
        await answer_classification(interaction, reply)


@app_commands.context_menu(name="Identify car")
async def identify_car(interaction: discord.Interaction[CarBot], message: discord.Message) -> None:
    conversation, sender = interaction.client.conversation, interaction_sender(interaction)
    image = next((attachment for attachment in message.attachments if is_image(attachment)), None)
    if image is None:
        kind = hint_kind(message.attachments[0]) if message.attachments else "sticker" if message.stickers else "text"
        await interaction.response.send_message(**render(conversation.hint(sender, kind)), ephemeral=True)
        return
    async with answering(interaction):
        await interaction.response.defer(thinking=True)
        # The message's author sent the photo: it is recorded as theirs too, so that their /forget removes it.
        download = download_of(interaction.client, sender, image)
        reply = await conversation.photo(sender, str(message.id), download, sent_by=str(message.author.id))
        await answer_classification(interaction, reply)


async def run_command(interaction: discord.Interaction[CarBot], name: str) -> None:
    """A command answered by the conversation, seen only by the person who sent it.

    A retrain's progress message is the exception: the bot edits it for as long as the run takes,
    which Discord allows only on a message everyone in the channel sees. Whether the answer is
    public is chosen when the command is deferred, before the answer is known (Discord keeps it):
    an admin's /retrain is answered in public, whatever its outcome.
    """
    conversation, sender = interaction.client.conversation, interaction_sender(interaction)
    async with answering(interaction):
        public = name == "retrain" and sender.is_admin
        await interaction.response.defer(thinking=True, ephemeral=not public)
        reply = await conversation.command(sender, name)
        sent = await answer_deferred(interaction, reply)
        if reply.progress_of is not None:
            reference = f"{interaction.channel_id}:{sent.id}"
            await after_answering(conversation.set_progress_message(reply.progress_of, reference), "progress message")


@app_commands.command(name="help", description="What this bot does, and what it keeps about you.")
async def help_command(interaction: discord.Interaction[CarBot]) -> None:
    await run_command(interaction, "help")


@app_commands.command(name="forget", description="Delete your photos, my answers to you and your votes.")
async def forget(interaction: discord.Interaction[CarBot]) -> None:
    await run_command(interaction, "forget")


@app_commands.command(name="stats", description="Answers, votes and accuracy by feedback (admins).")
@app_commands.default_permissions(administrator=True)
async def stats(interaction: discord.Interaction[CarBot]) -> None:
    await run_command(interaction, "stats")


@app_commands.command(name="model", description="The active model (admins).")
@app_commands.default_permissions(administrator=True)
async def model(interaction: discord.Interaction[CarBot]) -> None:
    await run_command(interaction, "model")


@app_commands.command(name="retrain", description="Fine-tune the model on the corrections (admins).")
@app_commands.default_permissions(administrator=True)
async def retrain(interaction: discord.Interaction[CarBot]) -> None:
    await run_command(interaction, "retrain")


@app_commands.command(name="rollback", description="Return to the previous model version (admins).")
@app_commands.default_permissions(administrator=True)
async def rollback(interaction: discord.Interaction[CarBot]) -> None:
    await run_command(interaction, "rollback")


async def deliver_notice(bot: CarBot, notice: Notice) -> None:
    """Show a retrain notice: edit the progress message it names, else send a new message to its channel."""
    if notice.edit is not None:
        channel_id, _, message_id = notice.edit.partition(":")
        channel = bot.get_channel(int(channel_id)) or await bot.fetch_channel(int(channel_id))
        try:
            await channel.get_partial_message(int(message_id)).edit(**render(notice.reply, edit=True))
            return
        except discord.HTTPException as exc:
            log.info("could not edit the retrain message, sending a new one: %s", exc)
    channel = bot.get_channel(int(notice.chat_id)) or await bot.fetch_channel(int(notice.chat_id))
    sent = await channel.send(**render(notice.reply))
    if notice.reply.progress_of is not None:
        await bot.conversation.set_progress_message(notice.reply.progress_of, f"{sent.channel.id}:{sent.id}")


async def on_command_error(interaction: discord.Interaction[CarBot], error: app_commands.AppCommandError) -> None:
    """What the command tree could not run (a command Discord still lists but this version lacks, say)."""
    log.error("application command failed: %s", error, exc_info=error)
    await apologise(interaction)


@contextlib.asynccontextmanager
async def answering(interaction: discord.Interaction[CarBot]) -> AsyncIterator[None]:
    """Handle an interaction; if anything fails, the person gets a readable apology rather than nothing."""
    try:
        yield
    except Exception:
        log.exception("could not answer a Discord interaction")
        await apologise(interaction)


async def apologise(interaction: discord.Interaction[CarBot]) -> None:
    """Say that something went wrong: as the answer, or after the acknowledgement or answer already sent.

    After a "thinking…" deferral Discord turns the first follow-up into that message, so the apology replaces it.
    """
    apology = interaction.client.conversation.apology(interaction_sender(interaction)).text
    try:
        if interaction.response.is_done():
            await interaction.followup.send(apology, ephemeral=True)
        else:
            await interaction.response.send_message(apology, ephemeral=True)
    except discord.HTTPException as exc:  # the interaction's token lapsed, or Discord is unreachable
        log.warning("could not tell the person that their interaction failed: %s", exc)


async def answer_deferred(interaction: discord.Interaction[CarBot], reply: Reply) -> discord.InteractionMessage:
    """The answer to a command deferred with "thinking…": it becomes that message."""
    fields = render(reply)
    if "file" in fields:
        fields["attachments"] = [fields.pop("file")]
    return await interaction.edit_original_response(**fields)


async def answer_classification(interaction: discord.Interaction[CarBot], reply: Reply) -> None:
    """Answer a deferred interaction; a classification's message id is recorded for its prediction."""
    sent = await answer_deferred(interaction, reply)
    if reply.prediction_id is not None:
        recording = interaction.client.conversation.set_reply_message(reply.prediction_id, str(sent.id))
        await after_answering(recording, "reply message id")


async def after_answering(work: Awaitable[None], what: str) -> None:
    """Bookkeeping once the person has their answer: a failure is logged, not shown (their answer stands)."""
    try:
        await work
    except Exception:
        log.exception("answered, but could not record the %s", what)


# -- persistent components: 👍/👎 buttons, correction select menus, the typed-correction modal ------------------


# custom_ids of the persistent components (at most 100 characters; button data is at most 64 bytes).
BUTTON_ID = re.compile(r"carbot:(?P<data>.+)", re.DOTALL)
SELECT_ID = re.compile(r"carbot-select:(?P<key>.+)", re.DOTALL)
MODAL_ID = re.compile(r"carbot-modal:(?P<data>.+)", re.DOTALL)


class ConversationButton(discord.ui.DynamicItem[discord.ui.Button], template=BUTTON_ID):
    """A conversation button (👍, 👎, "another model…"); its custom_id carries its data, so it outlives the process."""

    def __init__(self, data: str, label: str = "") -> None:
        button = discord.ui.Button(
            label=clip(label, MAX_BUTTON_LABEL) or None, custom_id=f"carbot:{data}", style=discord.ButtonStyle.secondary
        )
        super().__init__(button)
        self.data = data

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> ConversationButton:
        return cls(match["data"], item.label or "")

    async def callback(self, interaction: discord.Interaction[CarBot]) -> None:
        await press(interaction, self.data)


class ChoiceSelect(discord.ui.DynamicItem[discord.ui.Select], template=SELECT_ID):
    """A row of `choice=True` buttons as one select menu; each option's value is a button's data."""

    def __init__(self, key: str, options: Sequence[discord.SelectOption]) -> None:
        menu = discord.ui.Select(custom_id=f"carbot-select:{key}"[:MAX_CUSTOM_ID], options=list(options))
        super().__init__(menu)

    @classmethod
    def of(cls, buttons: Sequence[Button], number: int) -> ChoiceSelect:
        # The key only has to be unique in its message: the menu's number and what its options' data share.
        key = f"{number}:{os.path.commonprefix([button.data for button in buttons])}"
        options = [discord.SelectOption(label=clip(b.text, MAX_OPTION_LABEL), value=b.data) for b in buttons]
        return cls(key, options)

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Select, match: re.Match[str], /
    ) -> ChoiceSelect:
        return cls(match["key"], item.options)

    async def callback(self, interaction: discord.Interaction[CarBot]) -> None:
        await press(interaction, self.item.values[0])


def correction_modal(prompt: str, bot_name: str, data: str) -> discord.ui.Modal:
    """Asks for the model's name; the button's `data` rides in its custom_id, back to `submit_correction`."""
    fits = len(prompt) <= MAX_MODAL_TITLE
    modal = discord.ui.Modal(
        title=prompt if fits else clip(bot_name, MAX_MODAL_TITLE) or "✏️",
        custom_id=f"carbot-modal:{data}"[:MAX_CUSTOM_ID],
        timeout=None,
    )
    if not fits:
        modal.add_item(discord.ui.TextDisplay(prompt))
    modal.add_item(discord.ui.Label(text="✏️", component=discord.ui.TextInput(max_length=MAX_TYPED_MODEL)))
    return modal


async def press(interaction: discord.Interaction[CarBot], data: str) -> None:
    """A button or menu choice: the notice for the presser alone, the message edited, a follow-up maybe."""
    conversation, sender = interaction.client.conversation, interaction_sender(interaction)
    async with answering(interaction):
        prompt = conversation.typing_prompt(sender, data)
        if prompt is not None:
            # A modal can only be the first answer to the press, and nothing may delay it: it opens before the
            # press is checked, and the conversation checks it when the modal comes back.
            name = interaction.client.user.display_name if interaction.client.user else ""
            modal = correction_modal(prompt.text, name, data)
            await interaction.response.send_modal(modal)
            modal.stop()  # not kept by discord.py: `on_interaction` answers it, even after a restart
            return
        await interaction.response.defer()  # acknowledged; the answer edits the message or follows it
        answer = await conversation.button(sender, data)
        follow_up = answer.follow_up
        if answer.edit is not None:
            await interaction.edit_original_response(**render(answer.edit, edit=True))
            if answer.notice and answer.notice != answer.edit.text:
                await interaction.followup.send(answer.notice, ephemeral=True)
            if follow_up is not None:
                await interaction.followup.send(**render(follow_up), ephemeral=True)
        elif follow_up is not None:
            # One message: the notice ("Thanks! Which model was it?") over the follow-up's components.
            content = answer.notice if follow_up.text in answer.notice else f"{answer.notice}\n{follow_up.text}"
            await interaction.followup.send(**render(follow_up, text=content), ephemeral=True)
        elif answer.notice:
            await interaction.followup.send(answer.notice, ephemeral=True)


async def submit_correction(interaction: discord.Interaction[CarBot], data: str, typed: str) -> None:
    """The modal came back: the press that opened it is checked, then what was typed is matched."""
    conversation, sender = interaction.client.conversation, interaction_sender(interaction)
    async with answering(interaction):
        await interaction.response.defer(thinking=True, ephemeral=True)
        answer = await conversation.button(sender, data)
        if answer.follow_up is not None and answer.follow_up.expects_text:
            reply = await conversation.text(sender, typed) or conversation.hint(sender, "text")
        else:  # a stale press, or the database cannot take the correction now: the conversation says which
            reply = Reply(answer.notice)
        await answer_deferred(interaction, reply)


def typed_value(components: Any) -> str:
    """The text typed in a submitted modal (its one text input), from the interaction's raw components."""
    for component in components or []:
        if not isinstance(component, dict):
            continue
        if component.get("type") == discord.ComponentType.text_input.value:
            return str(component.get("value") or "")
        inner = [*(component.get("components") or []), *([component["component"]] if "component" in component else [])]
        found = typed_value(inner)
        if found:
            return found
    return ""


# -- rendering -----------------------------------------------------------------------------------------------


def render(reply: Reply, *, edit: bool = False, text: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `send`/`send_message`/`edit_message`: an embed for a classification, else text.

    For an edit, what the reply does not carry is cleared (embed or content, components).
    """
    text = reply.text if text is None else text
    out: dict[str, Any] = {}
    if reply.guesses is not None and reply.prediction_id is not None:
        out["embed"] = classification_embed(reply.guesses)
        if edit:
            out["content"] = None
    else:
        out["content"] = clip(text, MAX_CONTENT)
        if edit:
            out["embed"] = None
    view = build_view(reply.buttons)
    if view is not None or edit:
        out["view"] = view
    if reply.photo_path and not edit:
        out["file"] = discord.File(reply.photo_path)
    return out


def classification_embed(guesses: Guesses) -> discord.Embed:
    """The conversation's answer as an embed: its header the title, a line per candidate, its footer the footer."""
    embed = discord.Embed(
        title=clip(guesses.header, MAX_EMBED_TITLE),
        description=clip("\n".join(guesses.candidate_lines()), MAX_EMBED_DESCRIPTION),
        colour=discord.Colour.blurple(),
    )
    return embed.set_footer(text=clip(guesses.footer, MAX_EMBED_FOOTER))


def build_view(rows: Sequence[Sequence[Button]]) -> discord.ui.View | None:
    """Buttons row by row; all `choice=True` buttons become one select menu (25 options each) where the first was."""
    if not rows:
        return None
    view = discord.ui.View(timeout=None)
    for row, items in enumerate(layout(rows)):
        if row >= MAX_ROWS:
            log.warning("a reply has more than %d rows of components; the rest are left out", MAX_ROWS)
            break
        for item in items:
            item.row = row
            view.add_item(item)
    return view


def layout(rows: Sequence[Sequence[Button]]) -> Iterator[list[discord.ui.Item]]:
    choices = [button for row in rows for button in row if button.choice]
    menus_placed = False
    for row in rows:
        if not menus_placed and any(button.choice for button in row):
            menus_placed = True
            for number, chunk in enumerate(chunks(choices, MAX_OPTIONS)):
                yield [ChoiceSelect.of(chunk, number)]
        plain = [button for button in row if not button.choice]
        for chunk in chunks(plain, MAX_BUTTONS_PER_ROW):
            yield [ConversationButton(button.data, button.text) for button in chunk]


# -- small helpers -------------------------------------------------------------------------------------------


def is_image(attachment: discord.Attachment) -> bool:
    """Whether an attachment is a still image the classifier can read (by its content type, else its name)."""
    content_type = (attachment.content_type or "").split(";")[0].strip().lower()
    if content_type:
        return content_type.startswith("image/") and "svg" not in content_type
    return attachment.filename.lower().endswith(IMAGE_SUFFIXES)


def hint_kind(attachment: discord.Attachment) -> str:
    """The conversation's hint kind for an attachment that is not an image."""
    content_type = (attachment.content_type or "").lower()
    if attachment.is_voice_message() or content_type.startswith("audio/"):
        return "voice"
    if content_type.startswith("video/"):
        return "video"
    return "document"


def attachment_limit(conversation: Conversation) -> int:
    """Bigger attachments are refused before downloading: the active model's photo limit, which the classifier
    enforces anyway (or Discord's own upload limit for a classifier that sets none)."""
    return conversation.classifier.max_photo_bytes or MAX_UPLOAD_BYTES


def download_of(bot: CarBot, sender: Sender, attachment: discord.Attachment) -> PhotoDownload:
    """The attachment's download, run by the conversation only if the rate limit lets the photo through.

    A photo much larger than the model's input is also fetched resized by Discord's media proxy, beside
    the original: the model reads the copy (a phone's 12 megapixels would cost the bot about 30 ms of
    CPU to decode), the photo store keeps the original. Without a usable copy the original serves both.
    """
    conversation = bot.conversation

    async def download() -> bytes | Photo | Reply:
        limit, image_size = attachment_limit(conversation), conversation.image_size
        copy_url = resized_copy_url(attachment, image_size)
        if copy_url is None or attachment.size > limit:
            data = await read_attachment(attachment, limit)
        else:
            data, copy = await asyncio.gather(read_attachment(attachment, limit), read_copy(bot, copy_url))
            # Checked against the size asked for, even if the active model changed in between.
            if data is not None and copy is not None and usable_copy(copy, data, image_size):
                return Photo(copy, original=data)
        return unreadable(conversation, sender, attachment) if data is None else data

    return download


async def read_attachment(attachment: discord.Attachment, limit: int) -> bytes | None:
    if attachment.size > limit:
        # Refused unread: Discord lets some servers send files of hundreds of MB; no photo needs that.
        log.info("attachment %s refused unread: %d bytes", attachment.id, attachment.size)
        return None
    try:
        return await attachment.read()
    except (discord.HTTPException, OSError) as exc:
        log.warning("could not download attachment %s: %s", attachment.id, exc)
        return None


# Discord's media proxy (an attachment's `proxy_url`) serves an image resized to the `width` and `height` of
# its query: that is how Discord's own apps fetch a picture at the size they show it. Discord's API reference
# does not promise it (discord/discord-api-docs#6660), so a copy is used only when its header shows what was
# asked for (`usable_copy`); otherwise the original is classified, as it always was.


def resized_copy_url(attachment: discord.Attachment, image_size: int) -> str | None:
    """The media proxy's address of `attachment` resized so that its shorter side is `image_size`.

    None where a copy would not pay: the attachment's size is unknown (not an image, for Discord), or
    it is at most `REDUCE_ABOVE_INPUT_PIXELS` times the model's input, which the client queues as it is.
    """
    width, height = attachment.width or 0, attachment.height or 0
    if min(width, height) <= 0 or width * height <= REDUCE_ABOVE_INPUT_PIXELS * image_size**2:
        return None
    copy_width, copy_height = covering_size((width, height), image_size)
    size = [("width", str(copy_width)), ("height", str(copy_height))]
    parts = urlsplit(attachment.proxy_url)
    # The signature Discord put in the query (ex, is, hm) stays; only the size is ours.
    query = [(key, value) for key, value in parse_qsl(parts.query) if key not in ("width", "height")]
    return urlunsplit(parts._replace(query=urlencode(query + size)))


async def read_copy(bot: CarBot, url: str) -> bytes | None:
    """A resized copy from the media proxy, or None if it cannot be had (the original is used instead)."""
    try:
        return await bot.http.get_from_cdn(url)
    except Exception as exc:  # whatever went wrong, the original is on its way: a copy is only a saving
        log.info("no resized copy from Discord's media proxy (%s: %s); classifying the original",
                 type(exc).__name__, exc)  # fmt: skip
        return None


def usable_copy(copy: bytes, original: bytes, image_size: int) -> bool:
    """Whether the proxy's `copy` may stand for `original` before the model, read from both headers alone.

    It must be a smaller picture that still covers the model's input, upright the same way with the same
    shape: a copy the proxy did not resize, cropped, or turned (an EXIF rotation lost) is not used.
    """
    copy_size, original_size = upright_size(copy), upright_size(original)
    if copy_size is None or original_size is None:
        return False
    (width, height), (original_width, original_height) = copy_size, original_size
    same_shape = abs(width * original_height - height * original_width) <= (
        COPY_ASPECT_TOLERANCE * original_width * height
    )
    return same_shape and min(width, height) >= image_size and width * height < original_width * original_height


def unreadable(conversation: Conversation, sender: Sender, attachment: discord.Attachment) -> Reply:
    """The answer for an attachment that could not be had: too large to download, or the download failed."""
    if attachment.size > attachment_limit(conversation):
        return conversation.too_large(sender, attachment_limit(conversation))
    return conversation.hint(sender, "other")


def strip_mentions(content: str, user_id: int) -> str:
    return re.sub(rf"<@!?{user_id}>", " ", content or "").strip()


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- running -------------------------------------------------------------------------------------------------


def run_discord(settings: Settings) -> None:
    """`carbot discord`: Redis (and the embedded workers), the conversation, then the bot until stopped."""
    if settings.discord_token is None:
        raise ValueError("DISCORD_TOKEN is not set")
    with serving_redis(settings) as url, contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(settings, url))


async def _serve(settings: Settings, url: str) -> None:
    conversation = build_conversation(settings, url)
    try:
        async with build_bot(settings, conversation) as bot:
            await bot.start(settings.discord_token.get_secret_value())
    finally:
        await conversation.aclose()
