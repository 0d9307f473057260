"""The Telegram bot (python-telegram-bot 22): Telegram updates in, conversation calls, Telegram messages out.

Every decision is the conversation's (`bots._conversation`); this module only
translates. Each handler is a short coroutine, and `build_application` wires
them in one place, in the style of python-telegram-bot's examples:

- a photo is downloaded at the smallest size that still covers the model's input, an image
  sent as a file as its thumbnail when that covers it, and classified; a caption `/top3` asks for the same;
- `/top3` classifies the photo it replies to, or alone the chat's last photo (in groups
  with privacy mode the bot sees only commands and replies to it, so that is the way);
- `/start`, `/help`, `/forget`, `/stats`, `/model`, `/retrain`, `/rollback` and unknown
  commands go to `Conversation.command`;
- every button press is answered (`answerCallbackQuery`), then the message with the
  buttons is edited and a follow-up sent, as the conversation says;
- text (a typed correction) goes to `Conversation.text`; stickers, videos, voice notes
  and other files get a hint;
- a retrain's events (`follow_retrains`, beside polling) edit the admin's progress message
  and send the summary (`deliver_notice`).

`run_telegram(settings)` runs the bot with long polling, or behind a webhook when
`TELEGRAM_WEBHOOK_URL` is set. The token is never logged: the `httpx` logger (which
logs every URL, token included) is kept at WARNING, and errors are logged redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from telegram import (
    Bot,
    BotCommand,
    Document,
    ForceReply,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    PhotoSize,
    ReplyParameters,
    Update,
)
from telegram.constants import CallbackQueryLimit, ChatAction, ChatType, FileSizeLimit, MessageLimit
from telegram.error import BadRequest, Conflict, Forbidden, InvalidToken, NetworkError, TelegramError
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bots._assembly import build_conversation, serving_redis
from bots._conversation import Conversation, PhotoDownload
from bots._messages import Notice, Photo, Reply, Sender, is_admin
from bots._retrain_desk import follow_retrains
from carbot.retrain_runs import RunEvent
from carbot.settings import Settings

log = logging.getLogger(__name__)

# Telegram's limits, as python-telegram-bot states them: the Bot API hands out no file bigger than the first
# (only a local server in --local mode has no limit); then one message's text, a photo's caption, a callback notice.
DOWNLOAD_LIMIT = int(FileSizeLimit.FILESIZE_DOWNLOAD)
MAX_TEXT = int(MessageLimit.MAX_TEXT_LENGTH)
MAX_CAPTION = int(MessageLimit.CAPTION_LENGTH)
MAX_NOTICE = int(CallbackQueryLimit.ANSWER_CALLBACK_QUERY_TEXT_LENGTH)
# Commands that go to `Conversation.command` as they are (/top3 has its own handler).
COMMANDS = ("start", "help", "forget", "stats", "model", "retrain", "rollback")
# Shown in Telegram's command menu (admin commands work without being advertised).
MENU = (
    ("top3", "The top-3 models for a photo (reply to it, or the last one)"),
    ("help", "What this bot does and what it keeps"),
    ("forget", "Delete your photos, answers and votes"),
)
_KEY = "carbot"  # where the adapter keeps its state in `application.bot_data`


@dataclass(frozen=True)
class TelegramBot:
    """What the handlers share: the conversation, the settings, and what the active model asks of a download."""

    conversation: Conversation
    settings: Settings

    @property
    def max_download(self) -> int:
        """Bigger files are refused before downloading: the active model's limit, at most Telegram's own."""
        return min(self.conversation.classifier.max_photo_bytes or DOWNLOAD_LIMIT, DOWNLOAD_LIMIT)


# -- handlers ------------------------------------------------------------------------------------------------


async def on_photo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A photo, or an image sent as a file: classify it (albums come as one message per photo)."""
    message = update.effective_message
    bot = _bot(context)
    sender = sender_of(update, bot.settings)
    photo = _download(message, bot, sender)
    if isinstance(photo, Reply):
        await send_reply(message, photo, bot.conversation)
        return
    await _typing(message)
    if _command_of(message.caption, context.bot.username) == "top3":
        reply = await bot.conversation.top3(sender, str(message.message_id), photo)
    else:
        reply = await bot.conversation.photo(sender, str(message.message_id), photo)
    await send_reply(message, reply, bot.conversation)


async def on_top3(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """`/top3`: the photo it replies to, or the chat's last photo."""
    message = update.effective_message
    bot = _bot(context)
    sender = sender_of(update, bot.settings)
    photo, sent_by = None, None
    replied = message.reply_to_message
    if replied is not None and _image_of(replied) is not None:
        photo = _download(replied, bot, sender)
        if isinstance(photo, Reply):
            await send_reply(message, photo, bot.conversation)
            return
        # Someone else's photo, maybe: recorded as theirs too, so that their /forget removes it.
        sent_by = str(replied.from_user.id) if replied.from_user is not None else None
    await _typing(message)
    reply = await bot.conversation.top3(sender, str(message.message_id), photo, sent_by=sent_by)
    await send_reply(message, reply, bot.conversation)


async def on_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """`/start`, `/help`, `/forget`, the admin commands, and unknown ones (the conversation answers with help)."""
    message = update.effective_message
    name = _command_of(message.text, context.bot.username)
    if name is None:  # meant for another bot in the group
        return
    if name not in COMMANDS and message.chat.type != ChatType.PRIVATE and "@" not in message.text.split()[0]:
        return  # an unknown "/command" in a group may well be another bot's: only answer ours there
    _, _, args = (message.text or "").partition(" ")
    bot = _bot(context)
    reply = await bot.conversation.command(sender_of(update, bot.settings), name, args.strip())
    await send_reply(message, reply, bot.conversation)


async def on_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A button press: always answered, then the message edited and a follow-up sent as the conversation says."""
    query = update.callback_query
    bot = _bot(context)
    sender = sender_of(update, bot.settings)
    try:
        answer = await bot.conversation.button(sender, query.data or "")
    except Exception:
        # The person's client shows a spinner until the query is answered: answer it even now.
        with contextlib.suppress(TelegramError):
            await query.answer(bot.conversation.apology(sender).text)
        raise
    await query.answer(_clip(answer.notice, MAX_NOTICE) or None)
    message = query.message if isinstance(query.message, Message) else None
    if answer.edit is not None:
        try:
            await query.edit_message_text(_clip(answer.edit.text, MAX_TEXT), reply_markup=keyboard(answer.edit))
        except BadRequest as exc:
            # A second press on the same button, or a message too old to edit: nothing to change.
            log.info("could not edit message after a button press: %s", exc.message)
    if answer.follow_up is not None:
        if message is None:  # the message with the buttons is gone: write to the person directly
            await context.bot.send_message(query.from_user.id, _clip(answer.follow_up.text, MAX_TEXT),
                                           reply_markup=keyboard(answer.follow_up))  # fmt: skip
            return
        # Reply to the presser's own photo when the buttons answer it, so a group's ForceReply targets them.
        original = message.reply_to_message
        target = original if original is not None and original.from_user == query.from_user else message
        await send_reply(target, answer.follow_up, bot.conversation, selective=target is original)


async def on_text(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Plain text: a typed correction when the conversation asked for one, else a hint."""
    message = update.effective_message
    if not _addressed_to_bot(message, context.bot.id, context.bot.username):
        return
    bot = _bot(context)
    reply = await bot.conversation.text(sender_of(update, bot.settings), message.text)
    if reply is not None:
        await send_reply(message, reply, bot.conversation)


async def on_other(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Anything that is not a photo: a sticker, a video, a voice note, another kind of file..."""
    message = update.effective_message
    if not _addressed_to_bot(message, context.bot.id, context.bot.username):
        return  # in a group, stickers and chatter among people are none of the bot's business
    bot = _bot(context)
    await send_reply(message, bot.conversation.hint(sender_of(update, bot.settings), _kind_of(message)),
                     bot.conversation)  # fmt: skip


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Log what went wrong (without the token) and carry on; the person is told something failed."""
    error = context.error
    token = context.bot.token
    if isinstance(error, Forbidden):  # the person blocked the bot, or it was removed from the group
        log.info("telegram refused to deliver: %s", error.message)
        return
    if isinstance(error, NetworkError) and not isinstance(update, Update):  # polling hiccups; PTB retries
        log.warning("telegram is unreachable for now: %s", _redact(str(error), token))
        return
    if isinstance(error, Conflict):
        log.error("another instance of this bot is polling with the same token: %s", error.message)
        return
    detail = "".join(traceback.format_exception(error)) if error is not None else "unknown error"
    update_id = update.update_id if isinstance(update, Update) else None
    log.error("error while handling telegram update %s:\n%s", update_id, _redact(detail, token))
    bot = context.bot_data.get(_KEY)
    if (isinstance(update, Update) and update.effective_message is not None and update.callback_query is None
            and bot is not None):  # fmt: skip
        sender = sender_of(update, bot.settings) if update.effective_user else Sender("telegram", "", "")
        with contextlib.suppress(Exception):
            await update.effective_message.reply_text(
                bot.conversation.apology(sender).text,
                reply_parameters=ReplyParameters(update.effective_message.message_id, allow_sending_without_reply=True),
            )


# -- wiring --------------------------------------------------------------------------------------------------


def build_application(settings: Settings, conversation: Conversation) -> Application:
    """The python-telegram-bot application with every handler; not started."""
    if settings.telegram_token is None:
        raise ValueError("no Telegram token: set TELEGRAM_TOKEN")
    quiet_http_logs()
    builder = ApplicationBuilder().token(settings.telegram_token.get_secret_value())
    if settings.telegram_api_base_url:
        builder = builder.base_url(settings.telegram_api_base_url)
    if settings.telegram_file_base_url:
        builder = builder.base_file_url(settings.telegram_file_base_url)
    # Photos wait seconds for the worker: one person's photo must not hold up everybody else's updates.
    application = builder.concurrent_updates(True).build()

    application.bot_data[_KEY] = TelegramBot(conversation=conversation, settings=settings)

    new = filters.UpdateType.MESSAGE  # edited messages and channel posts are ignored
    application.add_handlers(
        [
            CommandHandler("top3", on_top3, filters=new),
            CommandHandler(COMMANDS, on_command, filters=new),
            MessageHandler(new & filters.COMMAND, on_command),
            MessageHandler(new & (filters.PHOTO | filters.Document.IMAGE) & ~filters.ANIMATION, on_photo),
            MessageHandler(new & filters.TEXT, on_text),
            MessageHandler(new & ~filters.StatusUpdate.ALL, on_other),
            CallbackQueryHandler(on_button),
        ]
    )
    application.add_error_handler(on_error)
    return application


def run_telegram(settings: Settings) -> None:
    """Run the Telegram bot until interrupted: long polling, or a webhook when `TELEGRAM_WEBHOOK_URL` is set.

    Brings up what the conversation needs: Redis (the private one when no `REDIS_URL` is set, and
    then a background worker too if none is running), the classify client, the store (migrated).
    """
    if settings.telegram_token is None:
        raise SystemExit("Set TELEGRAM_TOKEN to the token @BotFather gave you.")
    token = settings.telegram_token.get_secret_value()
    guard_logs(token)
    with serving_redis(settings) as url:
        conversation = build_conversation(settings, url)
        application = build_application(settings, conversation)
        background: list[asyncio.Task] = []

        async def post_init(app: Application) -> None:
            with contextlib.suppress(TelegramError):
                await app.bot.set_my_commands([BotCommand(name, about) for name, about in MENU])

            deliver = functools.partial(deliver_event, app.bot, conversation)
            background.append(asyncio.create_task(follow_retrains(conversation.retrain, "telegram", deliver)))
            log.info("telegram bot @%s is up", app.bot.username)

        async def post_shutdown(app: Application) -> None:
            for task in background:
                task.cancel()
            await conversation.aclose()

        application.post_init = post_init
        application.post_shutdown = post_shutdown
        try:
            if settings.telegram_webhook_url:
                application.run_webhook(
                    listen=settings.telegram_webhook_listen,
                    port=settings.telegram_webhook_port,
                    url_path=urlsplit(settings.telegram_webhook_url).path.lstrip("/"),
                    webhook_url=settings.telegram_webhook_url,
                    secret_token=webhook_secret(token),
                    allowed_updates=["message", "callback_query"],
                )
            else:
                application.run_polling(allowed_updates=["message", "callback_query"])
        except InvalidToken:
            # Its message quotes the token; say what happened without it.
            raise SystemExit("Telegram rejected TELEGRAM_TOKEN: check it with @BotFather.") from None


# -- pieces --------------------------------------------------------------------------------------------------


def sender_of(update: Update, settings: Settings) -> Sender:
    """Who wrote (or pressed), as the conversation knows people."""
    user = update.effective_user
    chat = update.effective_chat
    return Sender(
        platform="telegram",
        user_id=str(user.id),
        chat_id=str(chat.id if chat is not None else user.id),
        language_code=user.language_code,
        is_admin=is_admin(settings.admin_ids, "telegram", str(user.id)),
    )


def pick_photo_size(sizes: Sequence[PhotoSize], image_size: int) -> PhotoSize:
    """The smallest size whose shorter side still covers the model's input; the largest when none does."""
    covering = [size for size in sizes if min(size.width, size.height) >= image_size]
    if covering:
        return min(covering, key=lambda size: size.width * size.height)
    return max(sizes, key=lambda size: size.width * size.height)


def keyboard(reply: Reply) -> InlineKeyboardMarkup | None:
    """The reply's rows of buttons as an inline keyboard (Telegram has no select menu: choices are buttons too)."""
    if not reply.buttons:
        return None
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton(button.text, callback_data=button.data) for button in row] for row in reply.buttons]
    )


async def send_reply(message: Message, reply: Reply, conversation: Conversation, *, selective: bool = True) -> Message:
    """Send `reply` as a reply to `message` (plain text, no parse mode); returns the message that holds its buttons."""
    markup: InlineKeyboardMarkup | ForceReply | None = keyboard(reply)
    if markup is None and reply.expects_text:
        # The answer comes back as a reply, which the bot sees even in groups with privacy mode.
        markup = ForceReply(selective=selective and message.chat.type != ChatType.PRIVATE)
    quote = ReplyParameters(message.message_id, allow_sending_without_reply=True)
    chunks = _chunks(reply.text, MAX_TEXT)
    if reply.photo_path:
        with open(reply.photo_path, "rb") as picture:
            caption = chunks.pop(0) if len(chunks) == 1 and len(chunks[0]) <= MAX_CAPTION else None
            sent = await message.reply_photo(
                picture, caption=caption, reply_parameters=quote, reply_markup=None if chunks else markup
            )
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        sent = await message.reply_text(chunk, reply_parameters=quote, reply_markup=markup if last else None)
    if reply.prediction_id is not None:
        await conversation.set_reply_message(reply.prediction_id, str(sent.message_id))
    if reply.progress_of is not None:
        await conversation.set_progress_message(reply.progress_of, f"{sent.chat_id}:{sent.message_id}")
    return sent


async def deliver_event(bot: Bot, conversation: Conversation, event: RunEvent) -> None:
    """A retrain event from the stream: show its notices to the admin who asked, if they asked here."""
    if event.platform != "telegram":
        return
    for notice in await conversation.retrain_notices(event):
        try:
            await deliver_notice(bot, conversation, notice)
        except TelegramError as exc:  # one undeliverable notice (a blocked bot...) must not hold back the next
            log.warning("could not deliver a notice of retrain run %s: %s", event.run_id, exc)


async def deliver_notice(bot: Bot, conversation: Conversation, notice: Notice) -> None:
    """Show a retrain notice: edit the progress message it names, else send a new message to its chat."""
    reply = notice.reply
    if notice.edit is not None:
        chat_id, _, message_id = notice.edit.partition(":")
        try:
            await bot.edit_message_text(_clip(reply.text, MAX_TEXT), chat_id=chat_id, message_id=int(message_id),
                                        reply_markup=keyboard(reply))  # fmt: skip
            return
        except BadRequest as exc:
            if "not modified" in exc.message:
                return
            log.info("could not edit the retrain message, sending a new one: %s", exc.message)
    if reply.photo_path:
        with open(reply.photo_path, "rb") as picture:
            await bot.send_photo(notice.chat_id, picture)
    sent = await bot.send_message(notice.chat_id, _clip(reply.text, MAX_TEXT), reply_markup=keyboard(reply))
    if reply.progress_of is not None:
        await conversation.set_progress_message(reply.progress_of, f"{sent.chat_id}:{sent.message_id}")


def webhook_secret(token: str) -> str:
    """The webhook's secret token: Telegram sends it with every update, so forged requests are refused.

    Derived from the bot token (nothing more to configure), one-way, so it reveals nothing of it.
    """
    return hmac.new(token.encode(), b"carbot telegram webhook", hashlib.sha256).hexdigest()


class RedactToken(logging.Filter):
    """Replaces the bot token in log records (messages and tracebacks) with `<token>`."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.token in message:
            record.msg, record.args = _redact(message, self.token), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _redact(record.exc_text, self.token)
        if record.stack_info:
            record.stack_info = _redact(record.stack_info, self.token)
        return True


def guard_logs(token: str) -> None:
    """Keep the token out of this process's logs: quiet the loggers that print URLs, redact the rest.

    PTB itself logs an `InvalidToken` (whose message quotes the token) with its traceback, so
    every handler of the root logger gets a redacting filter.
    """
    quiet_http_logs()
    for handler in [*logging.getLogger().handlers, logging.lastResort]:
        if handler is not None and not any(isinstance(f, RedactToken) for f in handler.filters):
            handler.addFilter(RedactToken(token))


def quiet_http_logs() -> None:
    """httpx logs every request URL at INFO, PTB's bot the API URL at DEBUG: both contain the bot token.

    PTB's bot logs every call's parameters at DEBUG too (the webhook's secret among them): it stays at INFO.
    """
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("telegram.Bot", "telegram.ext.ExtBot"):
        bot_logger = logging.getLogger(name)
        if bot_logger.level < logging.INFO:
            bot_logger.setLevel(logging.INFO)


def pick_document_image(document: Document, image_size: int) -> PhotoSize | Document:
    """What to classify of an image sent as a file: its thumbnail when that covers the model's input.

    A phone's photo sent as a file is its full 12 megapixels; Telegram's thumbnail of it (up to
    320 px, 320x240 for a phone's 4:3) holds everything a 224 px model reads, as the photo sizes
    do, and decoding the file would cost the bot about 30 ms of CPU. The file itself is still
    downloaded beside it, to be kept for retraining. A thumbnail that does not cover the input (a
    wide 320x180, a larger model) leaves the file to be classified.
    """
    thumbnail = document.thumbnail
    if thumbnail is not None and min(thumbnail.width, thumbnail.height) >= image_size:
        return thumbnail
    return document


def _download(message: Message, bot: TelegramBot, sender: Sender) -> PhotoDownload | Reply:
    """The download of the message's image (run by the conversation if the rate limit allows), or the reply now."""
    image = _image_of(message)
    original = None  # an image sent as a file whose thumbnail is classified: the file, to be kept
    if isinstance(image, tuple):
        image = pick_photo_size(image, bot.conversation.image_size)
    elif isinstance(image, Document):
        document, image = image, pick_document_image(image, bot.conversation.image_size)
        if image is not document and (document.file_size is None or document.file_size <= bot.max_download):
            original = document
    if image is None:
        return bot.conversation.hint(sender, "document")
    if image.file_size is not None and image.file_size > bot.max_download:
        return bot.conversation.too_large(sender, bot.max_download)

    async def fetch(file_of: PhotoSize | Document) -> bytes:
        return bytes(await (await file_of.get_file()).download_as_bytearray())

    async def fetch_original() -> bytes | None:
        try:
            return await fetch(original) if original is not None else None
        except (TelegramError, OSError) as exc:  # the thumbnail is classified and kept instead
            log.warning("could not download the file behind a thumbnail: %s", exc)
            return None

    async def download() -> bytes | Photo | Reply:
        try:
            data, kept = await asyncio.gather(fetch(image), fetch_original())
        except BadRequest as exc:
            if "too big" in exc.message.lower():
                return bot.conversation.too_large(sender, bot.max_download)
            raise
        return data if kept is None else Photo(data, original=kept)

    return download


def _image_of(message: Message) -> tuple[PhotoSize, ...] | Document | None:
    """The message's photo sizes, or its document when that is an image."""
    if message.photo:
        return message.photo
    document = message.document
    if document is not None and (document.mime_type or "").startswith("image/"):
        return document
    return None


def _kind_of(message: Message) -> str:
    if message.sticker:
        return "sticker"
    if message.video or message.video_note:
        return "video"
    if message.voice or message.audio:
        return "voice"
    if message.animation:
        return "animation"
    if message.document:
        return "document"
    return "other"


def _command_of(text_: str | None, bot_username: str | None) -> str | None:
    """`/top3@thisbot args` -> "top3"; None when it is not a command or names another bot."""
    if not text_ or not text_.startswith("/"):
        return None
    name, _, target = text_.split(maxsplit=1)[0][1:].partition("@")
    if target and (bot_username is None or target.lower() != bot_username.lower()):
        return None
    return name.lower() or None


def _addressed_to_bot(message: Message, bot_id: int, bot_username: str | None) -> bool:
    """Private chats always; in groups only replies to the bot or mentions of it."""
    if message.chat.type == ChatType.PRIVATE:
        return True
    replied = message.reply_to_message
    if replied is not None and replied.from_user is not None and replied.from_user.id == bot_id:
        return True
    content = message.text or message.caption or ""
    return bool(bot_username) and f"@{bot_username.lower()}" in content.lower()


async def _typing(message: Message) -> None:
    with contextlib.suppress(TelegramError):
        await message.reply_chat_action(ChatAction.TYPING)


def _chunks(value: str, size: int) -> list[str]:
    value = value or "…"
    return [value[start : start + size] for start in range(0, len(value), size)]


def _clip(value: str, size: int) -> str:
    return value if len(value) <= size else value[: size - 1] + "…"


def _redact(value: str, token: str) -> str:
    return value.replace(token, "<token>") if token else value


def _bot(context: ContextTypes.DEFAULT_TYPE) -> TelegramBot:
    return context.bot_data[_KEY]
