"""A small fake of the Telegram Bot API, for driving the real python-telegram-bot stack in tests.

It is an asyncio HTTP/1.1 server (keep-alive, Content-Length or chunked bodies) on
127.0.0.1 and a free port, speaking just enough of the Bot API for a bot that
receives photos, sends messages with inline keyboards and answers callback queries:

    POST /bot<token>/<method>       form-urlencoded (PTB's way), multipart or JSON bodies
    GET  /file/bot<token>/<path>    file downloads (the `file_path` of getFile)

Point an application at it with ``ApplicationBuilder().base_url(fake.base_url)
.base_file_url(fake.base_file_url)``. A test pushes updates (``fake.send_photo(...)``,
``fake.press_button(...)``), the bot long-polls them with getUpdates, and every call the
bot makes is recorded in ``fake.calls`` (``await fake.wait_for("sendMessage")``).

Like the real server it says no where Telegram does: a wrong token (401), an unknown
method (404), an unknown or twice-answered callback query, an edit that changes nothing
("message is not modified"), callback data over 64 bytes, empty or overlong texts, and
files over the 20 MB download limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import itertools
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

# What the cloud Bot API lets a bot download (getFile refuses bigger files).
DOWNLOAD_LIMIT = 20 * 2**20
MAX_TEXT = 4096
MAX_CALLBACK_NOTICE = 200
MAX_CALLBACK_DATA = 64

# Parameters that are strings even when they look like JSON ("123" stays "123").
_STRING_PARAMS = frozenset(
    {"text", "caption", "file_id", "callback_query_id", "url", "secret_token", "parse_mode", "inline_message_id"}
)


class ApiError(Exception):
    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


@dataclass
class ApiCall:
    """One Bot API request the bot made: the method, its decoded parameters, and what was answered."""

    method: str
    params: dict[str, Any]
    ok: bool = True
    result: Any = None
    error: str | None = None
    at: float = field(default_factory=time.monotonic)


@dataclass
class StoredFile:
    file_id: str
    file_unique_id: str
    data: bytes
    file_path: str
    file_size: int


class FakeTelegram:
    """The fake Bot API server. Use ``async with FakeTelegram() as fake:``."""

    def __init__(self, token: str = "123:TEST", *, bot_id: int = 123, username: str = "carbot_test_bot") -> None:
        self.token = token
        self.bot_user = {
            "id": bot_id,
            "is_bot": True,
            "first_name": "CarBot",
            "username": username,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }
        self.calls: list[ApiCall] = []
        self.downloads: list[str] = []  # file paths fetched through /file/bot<token>/...
        self.messages: dict[tuple[int, int], dict] = {}  # (chat id, message id) -> message, both directions
        self.commands: list[dict] = []
        self.webhook: dict | None = None
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._updates: list[dict] = []
        self._update_ids = itertools.count(1000)
        self._message_ids = itertools.count(1)
        self._file_ids = itertools.count(1)
        self._query_ids = itertools.count(1)
        self._media_groups = itertools.count(1)
        self._files: dict[str, StoredFile] = {}
        self._files_by_path: dict[str, StoredFile] = {}
        self._chats: dict[int, dict] = {}
        self._open_queries: set[str] = set()
        self._answered_queries: set[str] = set()
        self._changed = asyncio.Condition()

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self) -> FakeTelegram:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._connections):
            writer.close()
        async with self._changed:
            self._changed.notify_all()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None

    async def __aenter__(self) -> FakeTelegram:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """For ``ApplicationBuilder.base_url``: PTB appends the token."""
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # -- what a test feeds in ---------------------------------------------------------------------------------

    @staticmethod
    def user(user_id: int, first_name: str = "Ana", *, language_code: str | None = "en") -> dict:
        user = {"id": user_id, "is_bot": False, "first_name": first_name}
        if language_code:
            user["language_code"] = language_code
        return user

    def private_chat(self, user: dict) -> dict:
        chat = {"id": user["id"], "type": "private", "first_name": user["first_name"]}
        self._chats[chat["id"]] = chat
        return chat

    def group_chat(self, chat_id: int, title: str = "Cars") -> dict:
        chat = {"id": chat_id, "type": "supergroup" if chat_id < -(10**12) else "group", "title": title}
        self._chats[chat_id] = chat
        return chat

    def add_file(self, data: bytes, *, file_size: int | None = None, suffix: str = "jpg") -> StoredFile:
        """Store a file the bot can download; `file_size` may claim more than `data` holds (a huge file)."""
        number = next(self._file_ids)
        stored = StoredFile(
            file_id=f"FILE{number:04d}-{'x' * 20}",
            file_unique_id=f"U{number:04d}",
            data=data,
            file_path=f"photos/file_{number}.{suffix}",
            file_size=len(data) if file_size is None else file_size,
        )
        self._files[stored.file_id] = stored
        self._files_by_path[stored.file_path] = stored
        return stored

    def new_media_group_id(self) -> str:
        return f"{13000000000000000 + next(self._media_groups)}"

    def message(self, chat: dict, user: dict, **content: Any) -> dict:
        """A message from `user` in `chat` (not yet delivered; see `deliver`)."""
        self._chats[chat["id"]] = chat
        message = {
            "message_id": next(self._message_ids),
            "from": user,
            "chat": chat,
            "date": int(time.time()),
            **{key: value for key, value in content.items() if value is not None},
        }
        self.messages[(chat["id"], message["message_id"])] = message
        return message

    def deliver(self, **update: Any) -> dict:
        """Queue an update for the bot's next getUpdates."""
        update = {"update_id": next(self._update_ids), **update}
        self._updates.append(update)
        self._wake()
        return update

    def send_text(self, chat: dict, user: dict, text: str, *, reply_to: dict | None = None) -> dict:
        entities = None
        if text.startswith("/"):
            length = len(text.split()[0])
            entities = [{"type": "bot_command", "offset": 0, "length": length}]
        message = self.message(chat, user, text=text, entities=entities, reply_to_message=_shallow(reply_to))
        self.deliver(message=message)
        return message

    def photo_sizes(self, sizes: Iterable[tuple[int, int, bytes]]) -> list[dict]:
        """PhotoSize objects, smallest first (as Telegram sends them), for (width, height, bytes) triples."""
        result = []
        for width, height, data in sizes:
            stored = self.add_file(data)
            result.append(
                {
                    "file_id": stored.file_id,
                    "file_unique_id": stored.file_unique_id,
                    "width": width,
                    "height": height,
                    "file_size": stored.file_size,
                }
            )
        return result

    def send_photo(
        self,
        chat: dict,
        user: dict,
        sizes: Iterable[tuple[int, int, bytes]],
        *,
        caption: str | None = None,
        media_group_id: str | None = None,
        reply_to: dict | None = None,
    ) -> dict:
        caption_entities = None
        if caption and caption.startswith("/"):
            caption_entities = [{"type": "bot_command", "offset": 0, "length": len(caption.split()[0])}]
        message = self.message(
            chat,
            user,
            photo=self.photo_sizes(sizes),
            caption=caption,
            caption_entities=caption_entities,
            media_group_id=media_group_id,
            reply_to_message=_shallow(reply_to),
        )
        self.deliver(message=message)
        return message

    def send_document(
        self,
        chat: dict,
        user: dict,
        data: bytes,
        *,
        mime_type: str,
        file_name: str,
        file_size: int | None = None,
        caption: str | None = None,
        thumbnail: tuple[int, int, bytes] | None = None,
    ) -> dict:
        """A file sent as a document; `thumbnail` is its (width, height, JPEG bytes), as a phone's app sends one."""
        stored = self.add_file(data, file_size=file_size, suffix=file_name.rsplit(".", 1)[-1])
        document = {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_name": file_name,
            "mime_type": mime_type,
            "file_size": stored.file_size,
        }
        if thumbnail is not None:
            document["thumbnail"] = self.photo_sizes([thumbnail])[0]
        message = self.message(chat, user, document=document, caption=caption)
        self.deliver(message=message)
        return message

    def send_sticker(self, chat: dict, user: dict, emoji: str = "🚗") -> dict:
        stored = self.add_file(b"RIFF....WEBP", suffix="webp")
        sticker = {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "type": "regular",
            "width": 512,
            "height": 512,
            "is_animated": False,
            "is_video": False,
            "emoji": emoji,
            "file_size": stored.file_size,
        }
        message = self.message(chat, user, sticker=sticker)
        self.deliver(message=message)
        return message

    def press_button(self, user: dict, message: dict, data: str) -> str:
        """`user` presses a button with `data` under the bot's `message`; returns the callback query id."""
        query_id = f"{next(self._query_ids)}{user['id']}"
        self._open_queries.add(query_id)
        current = self.messages.get((message["chat"]["id"], message["message_id"]), message)
        self.deliver(
            callback_query={
                "id": query_id,
                "from": user,
                "chat_instance": f"-{abs(message['chat']['id'])}77",
                "message": current,
                "data": data,
            }
        )
        return query_id

    # -- what a test reads back --------------------------------------------------------------------------------

    def calls_to(self, method: str, where: Callable[[ApiCall], bool] | None = None) -> list[ApiCall]:
        return [call for call in self.calls if call.method == method and (where is None or where(call))]

    async def wait_for(
        self,
        method: str,
        where: Callable[[ApiCall], bool] | None = None,
        *,
        count: int = 1,
        timeout: float = 15.0,
    ) -> list[ApiCall]:
        """Wait until the bot made `count` calls to `method` (matching `where`), and return them."""

        def found() -> bool:
            return len(self.calls_to(method, where)) >= count

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(found), timeout)
            except TimeoutError:
                seen = [(call.method, call.params) for call in self.calls if call.method != "getUpdates"]
                raise AssertionError(f"no {count} x {method} within {timeout} s; calls: {seen}") from None
        return self.calls_to(method, where)[:count]

    def bot_messages(self, chat_id: int) -> list[dict]:
        """Messages the bot sent in a chat, oldest first, in their current (edited) state."""
        return [
            message
            for (chat, _), message in sorted(self.messages.items())
            if chat == chat_id and message.get("from", {}).get("id") == self.bot_user["id"]
        ]

    # -- the HTTP side -----------------------------------------------------------------------------------------

    def _wake(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop: nobody can be waiting
            asyncio.get_running_loop().create_task(notify())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                method, target, headers, body = request
                status, content_type, payload = await self._dispatch(method, target, headers, body)
                head = (
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                    f"Content-Type: {content_type}\r\n"
                    f"Content-Length: {len(payload)}\r\n"
                    "Connection: keep-alive\r\n\r\n"
                )
                writer.write(head.encode("latin-1") + payload)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _dispatch(self, verb: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        path = unquote(urlsplit(target).path)
        file_prefix = f"/file/bot{self.token}/"
        if verb == "GET" and path.startswith(file_prefix):
            stored = self._files_by_path.get(path[len(file_prefix) :])
            if stored is None:
                return 404, "text/plain", b"Not Found"
            self.downloads.append(stored.file_path)
            self._wake()
            return 200, "application/octet-stream", stored.data
        if not path.startswith("/bot"):
            return 404, "text/plain", b"Not Found"
        token, _, api_method = path[len("/bot") :].partition("/")
        if token != self.token:
            return _json(401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
        params = _decode_params(headers.get("content-type", ""), body, urlsplit(target).query)
        call = ApiCall(api_method, params)
        handler = getattr(self, f"_api_{api_method}", None)
        try:
            if handler is None:
                raise ApiError(404, "Not Found")
            call.result = await handler(params)
        except ApiError as exc:
            call.ok, call.error = False, exc.description
            self.calls.append(call)
            self._wake()
            return _json(exc.code, {"ok": False, "error_code": exc.code, "description": exc.description})
        self.calls.append(call)
        self._wake()
        return _json(200, {"ok": True, "result": call.result})

    # -- Bot API methods ---------------------------------------------------------------------------------------

    async def _api_getMe(self, params: dict) -> dict:
        return self.bot_user

    async def _api_deleteWebhook(self, params: dict) -> bool:
        self.webhook = None
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return True

    async def _api_setWebhook(self, params: dict) -> bool:
        self.webhook = params
        return True

    async def _api_getWebhookInfo(self, params: dict) -> dict:
        return {"url": (self.webhook or {}).get("url", ""), "has_custom_certificate": False, "pending_update_count": 0}

    async def _api_setMyCommands(self, params: dict) -> bool:
        self.commands = list(params.get("commands") or [])
        return True

    async def _api_getMyCommands(self, params: dict) -> list:
        return self.commands

    async def _api_sendChatAction(self, params: dict) -> bool:
        self._chat(params)
        return True

    async def _api_getUpdates(self, params: dict) -> list[dict]:
        if self.webhook:
            raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active")
        offset = int(params.get("offset") or 0)
        limit = int(params.get("limit") or 100)
        timeout = float(params.get("timeout") or 0)
        if offset:
            self._updates = [update for update in self._updates if update["update_id"] >= offset]
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: bool(self._updates) or self._server is None), timeout
                )
        return self._updates[:limit]

    async def _api_getFile(self, params: dict) -> dict:
        stored = self._files.get(str(params.get("file_id")))
        if stored is None:
            raise ApiError(400, "Bad Request: invalid file_id")
        if stored.file_size > DOWNLOAD_LIMIT:
            raise ApiError(400, "Bad Request: file is too big")
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": stored.file_size,
            "file_path": stored.file_path,
        }

    async def _api_sendMessage(self, params: dict) -> dict:
        text = _text(params, "text")
        return self._bot_message(params, text=text)

    async def _api_sendPhoto(self, params: dict) -> dict:
        caption = params.get("caption")
        photo = [{"file_id": "SENT", "file_unique_id": "SENTU", "width": 320, "height": 240}]
        return self._bot_message(params, photo=photo, caption=caption)

    async def _api_editMessageText(self, params: dict) -> dict:
        message = self._own_message(params)
        text = _text(params, "text")
        markup = _inline_markup(params.get("reply_markup"))
        if message.get("text") == text and message.get("reply_markup") == markup:
            raise ApiError(
                400,
                "Bad Request: message is not modified: specified new message content and reply markup "
                "are exactly the same as a current content and reply markup of the message",
            )
        message["text"] = text
        _set_markup(message, markup)
        message["edit_date"] = int(time.time())
        return message

    async def _api_editMessageReplyMarkup(self, params: dict) -> dict:
        message = self._own_message(params)
        markup = _inline_markup(params.get("reply_markup"))
        if message.get("reply_markup") == markup:
            raise ApiError(400, "Bad Request: message is not modified")
        _set_markup(message, markup)
        message["edit_date"] = int(time.time())
        return message

    async def _api_answerCallbackQuery(self, params: dict) -> bool:
        query_id = str(params.get("callback_query_id"))
        if query_id not in self._open_queries or query_id in self._answered_queries:
            raise ApiError(400, "Bad Request: query is too old and response timeout expired or query ID is invalid")
        if len(str(params.get("text") or "")) > MAX_CALLBACK_NOTICE:
            raise ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        self._answered_queries.add(query_id)
        return True

    # -- helpers -----------------------------------------------------------------------------------------------

    def _chat(self, params: dict) -> dict:
        chat_id = params.get("chat_id")
        if not isinstance(chat_id, int):
            raise ApiError(400, "Bad Request: chat not found")
        return self._chats.setdefault(chat_id, {"id": chat_id, "type": "private", "first_name": "?"})

    def _bot_message(self, params: dict, **content: Any) -> dict:
        chat = self._chat(params)
        markup = params.get("reply_markup")
        inline = _inline_markup(markup)
        if markup is not None and inline is None and not _is_other_markup(markup):
            raise ApiError(400, "Bad Request: can't parse reply keyboard markup JSON object")
        reply_to = None
        reply = params.get("reply_parameters")
        if params.get("reply_to_message_id") is not None:
            reply = {"message_id": params["reply_to_message_id"]}
        if reply:
            reply_to = self.messages.get((chat["id"], int(reply["message_id"])))
            if reply_to is None and not reply.get("allow_sending_without_reply"):
                raise ApiError(400, "Bad Request: message to be replied not found")
        message = {
            "message_id": next(self._message_ids),
            "from": self.bot_user,
            "chat": chat,
            "date": int(time.time()),
            **{key: value for key, value in content.items() if value is not None},
        }
        if reply_to is not None:
            message["reply_to_message"] = _shallow(reply_to)
        _set_markup(message, inline)
        self.messages[(chat["id"], message["message_id"])] = message
        return message

    def _own_message(self, params: dict) -> dict:
        if params.get("inline_message_id"):
            raise ApiError(400, "Bad Request: message to edit not found")
        chat = self._chat(params)
        message = self.messages.get((chat["id"], int(params.get("message_id") or 0)))
        if message is None or message.get("from", {}).get("id") != self.bot_user["id"]:
            raise ApiError(400, "Bad Request: message to edit not found")
        return message


# -- HTTP and parameter parsing -------------------------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 409: "Conflict"}


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    line = await reader.readline()
    if not line:
        return None
    verb, target, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readline()
                break
            body += await reader.readexactly(size)
            await reader.readline()
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return verb, target, headers, body


def _decode_params(content_type: str, body: bytes, query: str) -> dict[str, Any]:
    raw: dict[str, Any] = dict(parse_qsl(query))
    if content_type.startswith("application/json") and body:
        return {**raw, **json.loads(body)}
    if content_type.startswith("multipart/form-data"):
        parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
        )
        for part in parsed.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if part.get_filename():
                raw[name] = payload  # an uploaded file: bytes
            else:
                raw[name] = payload.decode("utf-8")
    elif body:
        raw.update(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    return {name: _value(name, value) for name, value in raw.items()}


def _value(name: str, value: Any) -> Any:
    # PTB sends every parameter as a form field holding its JSON encoding, except plain strings.
    if not isinstance(value, str) or name in _STRING_PARAMS:
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _json(status: int, value: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(value).encode()


def _text(params: dict, name: str) -> str:
    text = params.get(name)
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "Bad Request: message text is empty")
    if len(text) > MAX_TEXT:
        raise ApiError(400, "Bad Request: message is too long")
    return text


def _inline_markup(markup: Any) -> dict | None:
    if not isinstance(markup, dict) or "inline_keyboard" not in markup:
        return None
    for row in markup["inline_keyboard"]:
        for button in row:
            data = button.get("callback_data")
            if data is not None and not 1 <= len(data.encode()) <= MAX_CALLBACK_DATA:
                raise ApiError(400, "Bad Request: BUTTON_DATA_INVALID")
            if not button.get("text"):
                raise ApiError(400, "Bad Request: text buttons are unallowed in the inline keyboard")
    return markup if markup["inline_keyboard"] else None


def _is_other_markup(markup: Any) -> bool:
    return isinstance(markup, dict) and bool({"force_reply", "keyboard", "remove_keyboard"} & set(markup))


def _set_markup(message: dict, markup: dict | None) -> None:
    # Telegram returns only inline keyboards inside Message objects.
    if markup:
        message["reply_markup"] = markup
    else:
        message.pop("reply_markup", None)


def _shallow(message: dict | None) -> dict | None:
    # A replied-to message comes without its own reply_to_message.
    if message is None:
        return None
    return {key: value for key, value in message.items() if key != "reply_to_message"}
