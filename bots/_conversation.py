"""The conversation, written once for every platform.

A photo comes in: it is checked, rate-limited, submitted through the worker
client, awaited, formatted as the top-3 with 👍/👎 buttons, and recorded. A
button press records a vote or a correction. Commands answer help, statistics
and admin requests. Adapters (Telegram, Discord, terminal) only translate their
platform's events into these calls and render the `Reply` they get back.
"""

from __future__ import annotations

import logging
import re
import time
from functools import lru_cache

import redis.asyncio as aioredis

from bots._labels import match_label
from bots._messages import Button, ButtonAnswer, Reply, Sender
from bots._ratelimit import RateLimiter
from bots._store import Store
from bots._texts import language_of, text
from carbot.settings import Settings
from model import ArtefactCorrupt, ModelRegistry, read_artefact
from worker import ClassifyClient, ClassifyError, ClassifyTimeout, PhotoRejected, Prediction, QueueBusy

log = logging.getLogger(__name__)

# Below this top-1 probability the answer says the bot is not sure (and still shows the three).
CONFIDENCE_THRESHOLD = 0.5
# Hints for messages that carry no photo; adapters pass one of these kinds to `hint`.
HINT_KINDS = ("sticker", "video", "voice", "animation", "document", "text", "other")


class Conversation:
    """One instance per bot process; every method is safe to call concurrently."""

    def __init__(
        self,
        *,
        classifier: ClassifyClient,
        store: Store,
        redis: aioredis.Redis,
        settings: Settings,
    ) -> None:
        self.classifier = classifier
        self.store = store
        self.redis = redis
        self.settings = settings
        self.registry = ModelRegistry(settings.registry_dir)
        self.limiter = RateLimiter(redis, per_minute=settings.rate_limit_per_minute)

    # -- photos ---------------------------------------------------------------------------------------------

    async def photo(self, sender: Sender, message_id: str | None, photo: bytes) -> Reply:
        """Classify a photo and answer with the top-3 and 👍/👎 buttons (or a friendly error)."""
        lang = language_of(sender)
        await self.remember_photo(sender, photo)
        if not await self.limiter.allow(sender):
            return Reply(text("rate_limited", lang, per_minute=self.limiter.per_minute))
        started = time.perf_counter()
        try:
            prediction = await self.classifier.classify(photo)
        except PhotoRejected as exc:
            return Reply(text("photo_rejected", lang, reason=str(exc)))
        except QueueBusy:
            return Reply(text("busy", lang))
        except ClassifyTimeout:
            return Reply(text("timeout", lang))
        except ClassifyError:
            log.exception("classification failed")
            return Reply(text("failed", lang))
        latency_ms = (time.perf_counter() - started) * 1000
        prediction_id = await self.store.record_prediction(
            sender,
            message_id=message_id,
            photo=photo,
            model_version=prediction.model_version,
            top_k=[{"label": c.label, "probability": c.probability} for c in prediction.top_k],
            latency_ms=latency_ms,
        )
        return self._answer(prediction, prediction_id, lang)

    async def top3(self, sender: Sender, message_id: str | None, photo: bytes | None) -> Reply:
        """`/top3`: classify `photo` (a replied-to or captioned photo), or the last photo seen in the chat."""
        if photo is None:
            photo = await self.last_photo(sender)
            if photo is None:
                return Reply(text("no_photo_yet", language_of(sender)))
        return await self.photo(sender, message_id, photo)

    async def remember_photo(self, sender: Sender, photo: bytes) -> None:
        """Keep the chat's last photo for a while, so `/top3` alone can classify it."""
        await self.redis.set(self._last_photo_key(sender), photo, ex=3600)

    async def last_photo(self, sender: Sender) -> bytes | None:
        return await self.redis.get(self._last_photo_key(sender))

    async def set_reply_message(self, prediction_id: int, message_id: str) -> None:
        """Adapters call this with the id of the message that carries a classification."""
        await self.store.set_reply_message(prediction_id, message_id)

    # -- buttons --------------------------------------------------------------------------------------------

    async def button(self, sender: Sender, data: str) -> ButtonAnswer:
        """A 👍/👎/correction button was pressed. Forged or stale data gets a polite notice, nothing else.

        Button data: `v:<prediction>:u` / `v:<prediction>:d` (vote), `c:<prediction>:<label index>`
        (a correction) and `c:<prediction>:x` (another model, typed).
        """
        lang = language_of(sender)
        parsed = _parse_button(data)
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
            others = [c["label"] for c in record.top_k[1:]]
            question = self._choices(prediction_id, others, labels, "which_model", "another_model", lang)
            return ButtonAnswer(notice=text("thanks_down", lang), follow_up=question)
        if kind == "c" and value == "x":
            await self.redis.set(self._awaiting_key(sender), prediction_id, ex=600)
            return ButtonAnswer(
                notice=text("another_model", lang),
                follow_up=Reply(text("type_model", lang, example=labels[0] if labels else ""), expects_text=True),
            )
        if kind == "c" and value.isdigit() and int(value) < len(labels):
            label = labels[int(value)]
            await self.store.correct(prediction_id, sender, label)
            await self.redis.delete(self._awaiting_key(sender))
            done = text("corrected", lang, label=label)
            return ButtonAnswer(notice=done, edit=Reply(done))
        return ButtonAnswer(notice=text("stale", lang))

    async def text(self, sender: Sender, message: str) -> Reply | None:
        """Plain text: a typed correction when this person was asked for one, else a hint."""
        lang = language_of(sender)
        awaiting = await self.redis.get(self._awaiting_key(sender))
        record = await self.store.get_prediction(int(awaiting)) if awaiting else None
        if record is None:
            return self.hint(sender, "text")
        labels = self._labels(record.model_version)
        label, candidates = match_label(message, labels)
        if label is not None:
            await self.store.correct(record.id, sender, label)
            await self.redis.delete(self._awaiting_key(sender))
            return Reply(text("corrected", lang, label=label))
        if candidates:
            return self._choices(record.id, candidates, labels, "did_you_mean", "none_of_these", lang)
        example = labels[0] if labels else ""
        retry = ((Button(text("another_model", lang), f"c:{record.id}:x"),),)  # where typing needs a button first
        return Reply(text("no_match", lang, typed=message.strip()[:60], models=len(labels), example=example),
                     buttons=retry, expects_text=True)  # fmt: skip

    # -- commands -------------------------------------------------------------------------------------------

    async def command(self, sender: Sender, name: str, args: str = "") -> Reply:
        """`/start`, `/help`, `/forget`, `/top3`, and for admins `/stats`, `/model`, `/retrain`; others get help."""
        lang = language_of(sender)
        name = name.lower().lstrip("/")
        if name == "top3":
            return await self.top3(sender, None, None)
        if name == "forget":
            counts = await self.store.forget(sender)
            await self.redis.delete(self._awaiting_key(sender), self._last_photo_key(sender))
            return Reply(text("forgotten", lang, **counts))
        if name in ("stats", "model", "retrain"):
            if not sender.is_admin:
                return Reply(text("not_admin", lang))
            return await {"stats": self._stats, "model": self._model_info, "retrain": self._retrain}[name](lang)
        active = self.registry.active(verify=False)
        return Reply(text("welcome", lang, models=len(active.labels) if active else 0,
                          retention=self.settings.photo_retention_days))  # fmt: skip

    def hint(self, sender: Sender, kind: str) -> Reply:
        """A short, friendly hint for a message that is not a photo (`kind` is one of HINT_KINDS)."""
        return Reply(text(f"hint_{kind if kind in HINT_KINDS else 'other'}", language_of(sender)))

    # -- internals ------------------------------------------------------------------------------------------

    def _answer(self, prediction: Prediction, prediction_id: int, lang: str) -> Reply:
        best = prediction.top_k[0].probability if prediction.top_k else 0.0
        lines = [text("header_sure" if best >= CONFIDENCE_THRESHOLD else "header_unsure", lang)]
        for rank, candidate in enumerate(prediction.top_k, start=1):
            lines.append(f"{rank}. {candidate.label} — {candidate.probability:.0%} {_bar(candidate.probability)}")
        lines.append(text("footer", lang, version=prediction.model_version))
        buttons = ((Button(text("button_up", lang), f"v:{prediction_id}:u"),
                    Button(text("button_down", lang), f"v:{prediction_id}:d")),)  # fmt: skip
        return Reply("\n".join(lines), buttons=buttons, prediction_id=prediction_id)

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

    async def _retrain(self, lang: str) -> Reply:
        return Reply(text("retrain_soon", lang))

    @staticmethod
    def _awaiting_key(sender: Sender) -> str:
        # Which prediction this person is typing a correction for.
        return f"carbot:awaiting:{sender.platform}:{sender.chat_id}:{sender.user_id}"

    @staticmethod
    def _last_photo_key(sender: Sender) -> str:
        return f"carbot:last-photo:{sender.platform}:{sender.chat_id}"


_BUTTON = re.compile(r"^(?P<kind>[vc]):(?P<prediction>\d{1,18}):(?P<value>[udx]|\d{1,4})$")


def _parse_button(data: str) -> tuple[str, int, str] | None:
    match = _BUTTON.match(data or "")
    if match is None or (match["kind"] == "v") != (match["value"] in ("u", "d")):
        return None
    return match["kind"], int(match["prediction"]), match["value"]


def _bar(probability: float, width: int = 10) -> str:
    filled = round(probability * width)
    return "▰" * filled + "▱" * (width - filled)


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"
