"""The conversation, written once for every platform.

A photo comes in: it is checked, rate-limited, submitted through the worker
client, awaited, formatted as the top-3 with 👍/👎 buttons, and recorded. A
button press records a vote or a correction. Commands answer help, statistics
and admin requests. Adapters (Telegram, Discord, terminal) only translate their
platform's events into these calls and render the `Reply` they get back.
Retraining is the one thing that speaks unprompted: `retrain_notices` turns a
retrain job's event into the messages its admin should see.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from functools import lru_cache
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from bots._labels import match_label
from bots._messages import Button, ButtonAnswer, Guesses, Notice, Photo, Reply, Sender
from bots._ratelimit import RateLimiter
from bots._retrain_desk import RetrainDesk, RollbackBusy
from bots._store import Store, StoreUnavailable
from bots._texts import language_of, text
from carbot import keys, metrics
from carbot.connections import redis_connection
from carbot.db import RetrainRun, RunStatus
from carbot.photos import photo_name
from carbot.retrain_runs import DECISIONS, FINAL_STATUSES, REPORT_IMAGE, RunEvent
from carbot.settings import Settings
from model import ArtefactCorrupt, ModelRegistry, Preprocessing, read_artefact
from worker import (
    Classification,
    ClassifyClient,
    ClassifyError,
    ClassifyTimeout,
    PhotoRejected,
    QueueBusy,
    RejectReason,
    active_preprocessing,
)

log = logging.getLogger(__name__)

# A photo not fetched yet: the adapter's download, awaited only once the rate limit lets the photo
# through, so a flood costs the bot no downloads. It gives the bytes (or a `Photo`, where the platform
# gave a smaller copy beside the original), or the reply to give instead.
PhotoDownload = Callable[[], Awaitable["bytes | Photo | Reply"]]

T = TypeVar("T")

# Below this top-1 probability the answer says the bot is not sure (and still shows the three).
CONFIDENCE_THRESHOLD = 0.5
# Hints for messages that carry no photo; adapters pass one of these kinds to `hint`.
HINT_KINDS = ("sticker", "video", "voice", "animation", "document", "text", "other")
# How long a person waits on the database (a vote, a correction, recording an answer) before being told it
# cannot be saved right now: under Telegram's limit for answering a button press, and well under SQLite's
# 30 s busy timeout. The write itself carries on in its thread and may still land; votes are idempotent,
# so pressing again after "try again" is always safe.
STORE_PATIENCE_S = 10.0
# Redis connections one bot process opens at most; a burst of chats beyond it waits its turn. redis-py's own
# asyncio pool stops at 100 and raises "Too many connections" past that (the load test, 500 people at once).
REDIS_CONNECTIONS = 64


def connect_redis(url: str) -> aioredis.Redis:
    """The conversation's Redis client: a bounded pool where a burst of chats waits for a free connection."""
    return redis_connection(url, asyncio=True, max_connections=REDIS_CONNECTIONS, pool_timeout=20)


class Conversation:
    """One instance per bot process; every method is safe to call concurrently."""

    def __init__(
        self,
        *,
        classifier: ClassifyClient,
        store: Store,
        redis: aioredis.Redis,
        settings: Settings,
        retrain: RetrainDesk | None = None,
    ) -> None:
        self.classifier = classifier
        self.store = store
        self.redis = redis
        self.settings = settings
        self.retrain = retrain  # None: this bot cannot queue retrains (/retrain says so)
        self.registry = ModelRegistry(settings.registry_dir)
        self.limiter = RateLimiter(redis, per_minute=settings.rate_limit_per_minute)
        self.store_patience_s = STORE_PATIENCE_S

    # -- photos ---------------------------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        """The active model's input side, in pixels: adapters fetch the smallest copy of a photo that covers it."""
        return (self.classifier.preprocessing_now() or Preprocessing()).image_size

    @metrics.observe_photo
    async def photo(
        self,
        sender: Sender,
        message_id: str | None,
        photo: bytes | Photo | PhotoDownload,
        *,
        sent_by: str | None = None,
    ) -> Reply:
        """Classify a photo and answer with the top-3 and 👍/👎 buttons (or a friendly error).

        `photo`: its bytes (or a `Photo`), or its download (a `PhotoDownload`), awaited only if the rate limit
        allows.
        `sent_by`: the platform user id of whoever sent the photo when the sender only asks about it (a
        /top3 reply, Discord's "Identify car"); the photo is then recorded as theirs too, for their /forget.
        """
        lang = language_of(sender)
        try:
            # The rate limit comes first: a refused photo is stored nowhere, not even for /top3.
            allowed = await self.limiter.allow(sender)
        except (RedisError, OSError):
            # Redis is down or restarting: nothing was submitted. An apology now beats no answer at all.
            log.warning("Redis is unreachable; the photo was not submitted")
            return Reply(text("failed", lang))
        if not allowed:
            return Reply(text("rate_limited", lang, per_minute=self.limiter.per_minute))
        if callable(photo):
            photo = await photo()
            if isinstance(photo, Reply):  # too large to fetch, or unreadable: nothing to classify
                return photo
        if isinstance(photo, bytes):
            photo = Photo(photo)
        # The original's name: the store keeps it under this, and a copy queued for the model is filed under it.
        name = photo_name(photo.kept)
        started = time.perf_counter()
        try:
            prediction = await self.classifier.classify(
                photo.data, original_name=None if photo.original is None else name
            )
        except PhotoRejected as exc:
            metrics.photo_outcome("rejected")
            return Reply(text("photo_rejected", lang, reason=self._rejection(exc, lang)))
        except QueueBusy:
            metrics.photo_outcome("busy")
            return Reply(text("busy", lang))
        except ClassifyTimeout:
            metrics.photo_outcome("timeout")
            return Reply(text("timeout", lang))
        except ClassifyError:
            metrics.photo_outcome("failed")
            log.exception("classification failed")
            return Reply(text("failed", lang))
        metrics.photo_outcome("answered")
        latency_ms = (time.perf_counter() - started) * 1000
        try:
            prediction_id = await self._patiently(self.store.record_prediction(
                sender,
                message_id=message_id,
                photo=photo.kept,
                model_version=prediction.model_version,
                top_k=prediction.top_k,
                latency_ms=latency_ms,
                photo_sent_by=sent_by,
            ))  # fmt: skip
        except StoreUnavailable:
            # The person still gets the answer; without a stored prediction there is nothing to vote on.
            log.warning("answer given without buttons: the prediction could not be recorded")
            prediction_id = None
        # By the original's name, as the store keeps it (the queue held a copy reduced for the model).
        await self.remember_photo(sender, name, sent_by=sent_by)
        return self._answer(prediction, prediction_id, lang)

    async def top3(
        self,
        sender: Sender,
        message_id: str | None,
        photo: bytes | Photo | PhotoDownload | None,
        *,
        sent_by: str | None = None,
    ) -> Reply:
        """`/top3`: classify `photo` (a replied-to or captioned photo), or the last photo seen in the chat.

        `sent_by` as for `photo`; the chat's last photo is recorded as its own sender's.
        """
        if photo is None:
            last = await self.last_photo(sender)
            if last is None:
                return Reply(text("no_photo_yet", language_of(sender)))
            photo, sent_by = last
        return await self.photo(sender, message_id, photo, sent_by=sent_by)

    async def remember_photo(self, sender: Sender, sha256: str, *, sent_by: str | None = None) -> None:
        """Note the chat's last photo for an hour, so `/top3` alone can classify it again; and whose it is, for /forget.

        By reference: Redis keeps its SHA-256, the bytes stay in the photo store (where
        they are kept only as long as the retention setting says).
        """
        owner = sent_by if sent_by is not None else sender.user_id
        key = keys.last_photo_key(sender.platform, sender.chat_id)
        index = keys.last_photos_of_key(sender.platform, owner)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping={"by": owner, "photo": sha256})
                pipe.expire(key, _LAST_PHOTO_TTL_S)
                # Where this person's photos may be the last one: their /forget looks there, nowhere else.
                pipe.sadd(index, sender.chat_id)
                pipe.expire(index, _LAST_PHOTO_TTL_S)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("the chat's last photo was not noted: %s", exc)

    async def last_photo(self, sender: Sender) -> tuple[bytes, str | None] | None:
        """The chat's last photo (if it is still in the photo store) and the user id of its sender, or None."""
        try:
            sha, owner = await self.redis.hmget(keys.last_photo_key(sender.platform, sender.chat_id), ["photo", "by"])
        except ResponseError:  # a value of another type under the key (an older bot's): no usable photo
            return None
        try:
            photo = None if sha is None else await asyncio.to_thread(self.store.photos.get, sha.decode())
        except (ValueError, UnicodeDecodeError):  # not a digest: never used as a path
            return None
        if photo is None:
            return None
        return photo, owner.decode() if owner is not None else None

    async def _forget_in_redis(self, sender: Sender, photo_hashes: list[str]) -> None:
        """/forget's Redis side: the photos no longer recorded anywhere, and the chats' last photos the person sent."""
        index = keys.last_photos_of_key(sender.platform, sender.user_id)
        chats = {chat.decode() for chat in await self.redis.smembers(index)} | {sender.chat_id}
        for chat in sorted(chats):
            key = keys.last_photo_key(sender.platform, chat)
            # Only if it is still theirs: someone else's photo may have come since.
            await self.redis.eval(_DELETE_IF_SENT_BY, 1, key, sender.user_id)
        photo_keys = [keys.PHOTO_KEY_PREFIX + sha for sha in photo_hashes]
        copies = [keys.photo_copies_key(sha) for sha in photo_hashes]
        for listed in copies:  # the reduced copies queued for the model, under their own names
            photo_keys += [key.decode() for key in await self.redis.smembers(listed)]
        await self.redis.delete(index, _awaiting_key(sender), *photo_keys, *copies)

    async def set_reply_message(self, prediction_id: int, message_id: str) -> None:
        """Adapters call this with the id of the message that carries a classification."""
        await self.store.set_reply_message(prediction_id, message_id)

    # -- buttons --------------------------------------------------------------------------------------------

    @metrics.observe_button
    async def button(self, sender: Sender, data: str) -> ButtonAnswer:
        """A 👍/👎/correction button was pressed. Forged or stale data gets a polite notice, nothing else.

        When the database is unavailable the person is told to press again later (a vote is never
        reported as recorded unless it was).
        """
        try:
            return await self._patiently(self._button(sender, data))
        except StoreUnavailable:
            return ButtonAnswer(notice=text("store_unavailable", language_of(sender)))

    async def _button(self, sender: Sender, data: str) -> ButtonAnswer:
        """`button` itself.

        Button data: `v:<prediction>:u` / `v:<prediction>:d` (vote), `c:<prediction>:<label index>`
        (a correction), `c:<prediction>:x` (another model, typed), and for admins `r:<run>:p` /
        `r:<run>:x` (promote a rejected candidate anyway / discard it).
        """
        lang = language_of(sender)
        parsed = _parse_button(data)
        if parsed is not None and parsed[0] == "r":
            return await self._decide(sender, parsed[1], parsed[2] == "p", lang)
        record = await self.store.get_prediction(parsed[1]) if parsed else None
        # Buttons act on predictions of the chat they are in: a guessed id from elsewhere is stale here.
        if record is None or (record.platform, record.chat_id) != (sender.platform, sender.chat_id):
            return ButtonAnswer(notice=text("stale", lang))
        kind, prediction_id, value = parsed
        labels = self._labels(record.model_version)

        if kind == "v" and value == "u":
            changed = await self.store.vote(prediction_id, sender, "up")
            return ButtonAnswer(notice=text("thanks_up" if changed else "vote_unchanged", lang))
        if kind == "v" and value == "d":
            changed = await self.store.vote(prediction_id, sender, "down")
            if not changed:
                return ButtonAnswer(notice=text("vote_unchanged", lang))
            others = [c.label for c in record.top_k[1:]]
            question = self._choices(prediction_id, others, labels, "which_model", "another_model", lang)
            return ButtonAnswer(notice=text("thanks_down", lang), follow_up=question)
        if kind == "c" and value == "x":
            await self.redis.set(_awaiting_key(sender), prediction_id, ex=600)
            return ButtonAnswer(notice=text("another_model", lang), follow_up=_type_model(labels, lang))
        if kind == "c" and value.isdigit() and int(value) < len(labels):
            label = labels[int(value)]
            await self.store.correct(prediction_id, sender, label)
            await self.redis.delete(_awaiting_key(sender))
            done = text("corrected", lang, label=label)
            return ButtonAnswer(notice=done, edit=Reply(done))
        return ButtonAnswer(notice=text("stale", lang))

    def typing_prompt(self, sender: Sender, data: str) -> Reply | None:
        """What pressing button `data` asks when it means "let me type the model" (`c:<prediction>:x`), else None.

        Known without Redis or the database, for a platform that must answer the press at once with a form
        (Discord's modal): it shows this prompt, and when the form comes back it hands `data` to `button`
        (which checks the press) and what was typed to `text`.
        """
        parsed = _parse_button(data)
        if parsed is None or (parsed[0], parsed[2]) != ("c", "x"):
            return None
        version = self.registry.active_version()
        return _type_model(self._labels(version) if version else (), language_of(sender))

    async def text(self, sender: Sender, message: str) -> Reply | None:
        """Plain text: a typed correction when this person was asked for one, else a hint."""
        try:
            return await self._patiently(self._text(sender, message))
        except StoreUnavailable:
            return Reply(text("store_unavailable", language_of(sender)))

    async def _text(self, sender: Sender, message: str) -> Reply | None:
        lang = language_of(sender)
        awaiting = await self.redis.get(_awaiting_key(sender))
        record = await self.store.get_prediction(int(awaiting)) if awaiting else None
        if record is None:
            return self.hint(sender, "text")
        labels = self._labels(record.model_version)
        label, candidates = match_label(message, labels)
        if label is not None:
            await self.store.correct(record.id, sender, label)
            await self.redis.delete(_awaiting_key(sender))
            return Reply(text("corrected", lang, label=label))
        if candidates:
            return self._choices(record.id, candidates, labels, "did_you_mean", "none_of_these", lang)
        example = labels[0] if labels else ""
        retry = ((Button(text("another_model", lang), f"c:{record.id}:x"),),)  # where typing needs a button first
        return Reply(text("no_match", lang, typed=message.strip()[:60], models=len(labels), example=example),
                     buttons=retry, expects_text=True)  # fmt: skip

    # -- commands -------------------------------------------------------------------------------------------

    async def command(self, sender: Sender, name: str, args: str = "") -> Reply:
        """`/start`, `/help`, `/forget`, `/top3`, and for admins `/stats`, `/model`, `/retrain`, `/rollback`.

        Anything else gets the welcome text (which is the help).
        """
        try:
            return await self._command(sender, name, args)
        except StoreUnavailable:  # /forget, /stats: nothing was done; say so rather than fail
            return Reply(text("store_unavailable", language_of(sender)))

    async def _command(self, sender: Sender, name: str, args: str = "") -> Reply:
        lang = language_of(sender)
        name = name.lower().lstrip("/")
        if name == "top3":
            return await self.top3(sender, None, None)
        if name in ADMIN_COMMANDS and not sender.is_admin:
            return Reply(text("not_admin", lang))
        if name in ACTING_COMMANDS and args:
            # "/rollback v3" or "/forget everything" may mean something the command does not do.
            return Reply(text("takes_no_argument", lang, command=name))
        if name == "forget":
            counts = await self.store.forget(sender)
            await self._forget_in_redis(sender, counts.pop("photo_hashes"))
            return Reply(text("forgotten", lang, **counts))
        if name == "retrain":
            return await self._retrain(sender, lang)
        if name in ADMIN_COMMANDS:
            return await {"stats": self._stats, "model": self._model_info, "rollback": self._rollback}[name](lang)
        active = self.registry.active(verify=False)
        return Reply(text("welcome", lang, models=len(active.labels) if active else 0,
                          retention=self.settings.photo_retention_days))  # fmt: skip

    def hint(self, sender: Sender, kind: str) -> Reply:
        """A short, friendly hint for a message that is not a photo (`kind` is one of HINT_KINDS)."""
        return Reply(text(f"hint_{kind if kind in HINT_KINDS else 'other'}", language_of(sender)))

    def apology(self, sender: Sender) -> Reply:
        """What an adapter says when handling a message failed unexpectedly."""
        return Reply(text("failed", language_of(sender)))

    def too_large(self, sender: Sender, limit_bytes: int) -> Reply:
        """The answer for a file the platform will not hand over, or that is refused unread: over `limit_bytes`."""
        return Reply(text("photo_too_large", language_of(sender), limit_mb=_megabytes(limit_bytes)))

    async def aclose(self) -> None:
        """Close what `bots.build_conversation` opened: the classify client, the retrain desk, Redis, the store.

        Each is closed even when another fails (Redis may be gone already at shutdown).
        """
        closers = [self.classifier.aclose, *([self.retrain.aclose] if self.retrain else []), self.redis.aclose,
                   self.store.close]  # fmt: skip
        for close in closers:
            try:
                await close()
            except Exception as exc:
                log.warning("while closing the conversation: %s", exc)

    # -- internals ------------------------------------------------------------------------------------------

    async def _patiently(self, work: Awaitable[T]) -> T:
        """`work`, or `StoreUnavailable` once the person has waited `store_patience_s` on it."""
        try:
            return await asyncio.wait_for(work, self.store_patience_s)
        except TimeoutError:
            raise StoreUnavailable(f"no answer from the database within {self.store_patience_s:g} s") from None

    def _rejection(self, exc: PhotoRejected, lang: str) -> str:
        """Why the photo was rejected, in `lang` (the worker's own sentence when it gave no reason code)."""
        if exc.reason is None:
            return exc.message
        if exc.reason is RejectReason.TOO_LARGE:
            limit = self.classifier.max_photo_bytes or active_preprocessing(self.settings.registry_dir).max_bytes
            return text("reject_too_large", lang, limit_mb=_megabytes(limit))
        return text(f"reject_{exc.reason.value}", lang)

    def _answer(self, prediction: Classification, prediction_id: int | None, lang: str) -> Reply:
        best = prediction.top_k[0].probability if prediction.top_k else 0.0
        if prediction.unfamiliar:
            # Softmax confidence is high for photos the model cannot know; the feature-space score is not.
            # The guesses and the buttons stay: a wrongly flagged photo can still be voted on and corrected.
            header = "header_unfamiliar"
        else:
            header = "header_sure" if best >= CONFIDENCE_THRESHOLD else "header_unsure"
        if prediction_id is None:  # not recorded: the answer, but no buttons that could not be honoured
            guesses = Guesses(text(header, lang), prediction.top_k,
                              text("footer_unrecorded", lang, version=prediction.model_version))  # fmt: skip
            return Reply(guesses.as_text(), guesses=guesses)
        guesses = Guesses(text(header, lang), prediction.top_k, text("footer", lang, version=prediction.model_version))
        buttons = ((Button(text("button_up", lang), f"v:{prediction_id}:u"),
                    Button(text("button_down", lang), f"v:{prediction_id}:d")),)  # fmt: skip
        return Reply(guesses.as_text(), buttons=buttons, prediction_id=prediction_id, guesses=guesses)

    def _choices(self, prediction_id: int, names: list[str], labels: tuple[str, ...], question: str,
                 other: str, lang: str) -> Reply:  # fmt: skip
        """A question with one button per candidate label, and one to type another name."""
        rows = [(Button(name, f"c:{prediction_id}:{labels.index(name)}", choice=True),) for name in names
                if name in labels]  # fmt: skip
        rows.append((Button(text(other, lang), f"c:{prediction_id}:x"),))
        return Reply(text(question, lang), buttons=tuple(rows))

    @lru_cache(maxsize=16)  # noqa: B019 - one conversation per process; versions are few and immutable
    def _labels(self, version: str) -> tuple[str, ...]:
        """The label set of model `version` (the one that made the prediction)."""
        try:
            return read_artefact(self.registry.path_for(version), verify=False).labels
        except (FileNotFoundError, ValueError, ArtefactCorrupt):
            log.warning("labels of model %s are not readable", version)
            return ()

    async def _stats(self, lang: str) -> Reply:
        stats = await self.store.stats()
        lines = [text("stats", lang, **{**stats, "accuracy": _percent(stats["accuracy_by_feedback"])})]
        for version, numbers in sorted(stats["by_model"].items()):
            lines.append(text("stats_model", lang, version=version,
                              **{**numbers, "accuracy": _percent(numbers["accuracy_by_feedback"])}))  # fmt: skip
        return Reply("\n".join(lines))

    async def _model_info(self, lang: str) -> Reply:
        active = self.registry.active(verify=False)
        if active is None:
            return Reply(text("no_model", lang))
        metrics = "".join(f"\n  {name}: {value:.3f}" if isinstance(value, float) else f"\n  {name}: {value}"
                          for name, value in sorted(active.metrics.items()))  # fmt: skip
        return Reply(text("model_info", lang, version=active.version, backbone=active.backbone,
                          size=active.image_size, labels=len(active.labels),
                          created=active.created.strftime("%Y-%m-%d %H:%M UTC"), metrics=metrics))  # fmt: skip

    # -- retraining ----------------------------------------------------------------------------------------

    async def _retrain(self, sender: Sender, lang: str) -> Reply:
        if self.retrain is None:
            return Reply(text("retrain_unavailable", lang))
        request = await self.retrain.request(sender, lang)
        if request.run_id is None:  # another admin's request never got its number
            return Reply(text("retrain_starting", lang))
        if not request.queued:
            return Reply(text("retrain_running", lang, run=request.run_id)
                         + _progress_line(request.progress or {}, lang))  # fmt: skip
        waiting = "" if request.workers else "\n" + text("retrain_no_worker", lang, queue=self.settings.train_queue)
        return Reply(text("retrain_queued", lang, run=request.run_id) + waiting, progress_of=request.run_id)

    async def _rollback(self, lang: str) -> Reply:
        if self.retrain is None:
            return Reply(text("retrain_unavailable", lang))
        try:
            now, was = await self.retrain.rollback()  # carried out by the train worker
        except LookupError:
            return Reply(text("rollback_none", lang))
        except RollbackBusy:
            return Reply(text("rollback_busy", lang))
        return Reply(text("rollback_done", lang, version=now, was=was or "—"))

    async def _decide(self, sender: Sender, run_id: int, promote: bool, lang: str) -> ButtonAnswer:
        if not sender.is_admin:
            return ButtonAnswer(notice=text("not_admin", lang))
        decision = await self.retrain.decide(run_id, sender, promote) if self.retrain is not None else None
        if decision is None:
            return ButtonAnswer(notice=text("run_not_waiting", lang))
        if not decision.carried_out:  # the train worker's "decided" event tells the admin later
            return ButtonAnswer(notice=text("decision_queued", lang, run=run_id))
        done = text("promoted_by_admin" if promote else "discarded", lang, run=run_id,
                    version=decision.run.candidate_version)  # fmt: skip
        return ButtonAnswer(notice=done, edit=Reply(done))

    async def set_progress_message(self, run_id: int, reference: str) -> None:
        """Adapters call this with their reference of the message that shows a retrain's progress."""
        if self.retrain is not None:
            await self.retrain.set_progress_message(run_id, reference)

    async def retrain_notices(self, event: RunEvent) -> list[Notice]:
        """What the admin who asked for run `event.run_id` should see now: an edited progress message, a summary.

        An event read from Redis is only trusted for its run id, its kind and progress numbers: who is told,
        in which language, the error and the report picture all come from the run's record in SQL and
        the registry. A forged event for a run that does not exist, that belongs to another platform, or
        that says it finished while its record says otherwise, makes nothing at all.
        """
        run = await self.retrain.get_run(event.run_id) if self.retrain is not None else None
        if run is None or run.requested_by.partition(":")[0] != event.platform:
            return []
        lang = run.language if run.language in ("en", "pt") else "en"
        chat_id = run.chat_id
        progress = await self.retrain.progress_message(event.run_id)
        if event.kind in ("started", "progress"):
            if run.status not in (RunStatus.QUEUED, RunStatus.RUNNING):
                return []
            line = text("retrain_started" if event.kind == "started" else "retrain_progress_title", lang,
                        run=event.run_id) + _progress_line(_numbers(event.data), lang)  # fmt: skip
            return [Notice(chat_id, Reply(line, progress_of=event.run_id), edit=progress)]
        if event.kind == "decided":
            return await self._decision_notices(run, lang, progress)
        if event.kind == "failed" and run.status == RunStatus.FAILED:
            final = Reply(text("retrain_failed", lang, run=run.id, error=(run.error or "?")[:_ERROR_SHOWN]))
            message = final
        elif event.kind == "finished" and run.status in FINAL_STATUSES and run.status != RunStatus.FAILED:
            final = Reply(text("retrain_done", lang, run=run.id, minutes=_minutes(run)))
            message = self._summary(run, lang)
        else:
            return []
        # The progress message ends with the outcome; a new message carries the news (edits do not notify).
        edited = [Notice(chat_id, final, edit=progress)] if progress else []
        return edited + [Notice(chat_id, message)]

    async def _decision_notices(self, run: RetrainRun, lang: str, progress: str | None) -> list[Notice]:
        """The train worker carried out an admin's decision: the progress message says so, and the admin is told
        in a new message if the bot that took the decision stopped waiting for it (it answered "recorded")."""
        if run.status not in DECISIONS:  # refused by the registry: the run waits again, its buttons still work
            return []
        done = text(run.status, lang, run=run.id, version=run.candidate_version)
        final = Reply(text("retrain_done", lang, run=run.id, minutes=_minutes(run)) + "\n" + done)
        notices = [Notice(run.chat_id, final, edit=progress)] if progress else []
        if await self.retrain.take_unanswered(run.id):
            notices.append(Notice(run.chat_id, Reply(done)))
        return notices

    def report_picture(self, run: RetrainRun) -> str | None:
        """The report picture of run `run`'s candidate: found from its version name, and only inside the registry.

        The name is checked as a version name, and the resolved path (links followed) must lie in the
        registry's folder: a link planted in a version folder cannot make the bot send another file.
        """
        if not run.candidate_version:
            return None
        try:
            path = (self.registry.path_for(run.candidate_version) / REPORT_IMAGE).resolve(strict=True)
        except (ValueError, OSError):
            return None
        if not path.is_relative_to(self.registry.root.resolve()) or not path.is_file():
            log.warning("run %s: the report picture %s is not a file in the registry; not sent", run.id, path)
            return None
        return str(path)

    def _summary(self, run: RetrainRun, lang: str) -> Reply:
        reason = text(f"reason_{run.reason}", lang) if run.reason else ""
        failing = sorted((run.candidate_metrics or {}).get("failing_classes") or {})
        if failing:  # the classes the gate protected
            reason += " (" + ", ".join(failing[:5]) + (", …" if len(failing) > 5 else "") + ")"
        if run.candidate_version is None:  # nothing was trained, so there is nothing to compare or decide
            return Reply(text("summary_nothing", lang, run=run.id, reason=reason, base=run.base_version))
        active, candidate = run.active_metrics, run.candidate_metrics
        lines = [
            text("summary_promoted" if run.status == RunStatus.PROMOTED else "summary_rejected", lang, run=run.id,
                 candidate=run.candidate_version, base=run.base_version, reason=reason),
            text("summary_data", lang, **{name: run.counts.get(name, 0) for name in _COUNTS}),
            text("summary_metrics_head", lang, base=run.base_version, candidate=run.candidate_version),
        ]  # fmt: skip
        for part in ("overall", "base", "feedback"):
            if active.get(f"{part}_accuracy") is not None:
                lines.append(text(f"summary_{part}", lang, n=active.get(f"{part}_n", 0),
                                  active=_percent(active.get(f"{part}_accuracy")),
                                  candidate=_percent(candidate.get(f"{part}_accuracy"))))  # fmt: skip
        buttons: tuple[tuple[Button, ...], ...] = ()
        if run.status == RunStatus.REJECTED:
            buttons = ((Button(text("button_promote", lang), f"r:{run.id}:p"),
                        Button(text("button_discard", lang), f"r:{run.id}:x")),)  # fmt: skip
        return Reply("\n".join(lines), buttons=buttons, photo_path=self.report_picture(run))


_LAST_PHOTO_TTL_S = 3600  # how long /top3 alone finds the chat's last photo
# Delete KEYS[1] (a chat's last photo) only if its sender is ARGV[1]: checked and done in one step.
_DELETE_IF_SENT_BY = """
if redis.call('HGET', KEYS[1], 'by') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
ADMIN_COMMANDS = ("stats", "model", "retrain", "rollback")
# Commands that change something: given an argument they do nothing, rather than guess.
ACTING_COMMANDS = ("forget", "retrain", "rollback")
_PROGRESS_FIELDS = ("epoch", "epochs", "loss", "accuracy", "eta_s")
_ERROR_SHOWN = 300  # characters of a failed run's error the admin is shown
_COUNTS = ("base_train", "feedback_train", "oversample", "base_holdout", "feedback_holdout", "feedback_skipped")
# ASCII digits only, the whole string: data a client sends back is exactly what we wrote, or it is stale.
_BUTTON = re.compile(r"(?P<kind>[vcr]):(?P<id>\d{1,18}):(?P<value>[udpx]|\d{1,4})", re.ASCII)
# Which values each kind of button carries: a vote up/down, a label index or "x", promote/discard.
_BUTTON_VALUES = {"v": re.compile(r"[ud]"), "c": re.compile(r"x|\d{1,4}"), "r": re.compile(r"[px]")}


def _parse_button(data: str) -> tuple[str, int, str] | None:
    match = _BUTTON.fullmatch(data or "")
    if match is None or not _BUTTON_VALUES[match["kind"]].fullmatch(match["value"]):
        return None
    return match["kind"], int(match["id"]), match["value"]


def _type_model(labels: tuple[str, ...], lang: str) -> Reply:
    """The question that asks a person to type the model's name."""
    return Reply(text("type_model", lang, example=labels[0] if labels else ""), expects_text=True)


def _progress_line(data: dict, lang: str) -> str:
    """ "epoch 3/5 · loss 0.41 · accuracy 88% · about 2 min left", or nothing before the first epoch ends."""
    if "epoch" not in data:
        return ""
    return "\n" + text("retrain_progress", lang, epoch=data["epoch"], epochs=data.get("epochs", "?"),
                       loss=data.get("loss", float("nan")), accuracy=_percent(data.get("accuracy")),
                       left=max(1, round(data.get("eta_s", 0) / 60)))  # fmt: skip


def _minutes(run: RetrainRun) -> int:
    return max(1, round((run.duration_s or 0) / 60))


def _numbers(data: object) -> dict:
    """The numbers of a progress event's data, nothing else (it was read from Redis)."""
    if not isinstance(data, dict):
        return {}
    return {key: value for key, value in data.items()
            if key in _PROGRESS_FIELDS and isinstance(value, int | float) and not isinstance(value, bool)}  # fmt: skip


def _awaiting_key(sender: Sender) -> str:
    """Where the prediction this person is typing a correction for, in this chat, is noted."""
    return keys.awaiting_key(sender.platform, sender.chat_id, sender.user_id)


def _megabytes(size: int) -> int:
    """A limit in whole MB, rounded up: Telegram's 20,000,000 bytes are its "20 MB", 25 MiB are 25."""
    return -(-size // 2**20)


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"
