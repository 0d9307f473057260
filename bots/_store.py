"""What the conversation remembers: people, predictions, votes and photos, behind an asyncio facade.

Every public method of `Store` is a coroutine that runs its SQL (and file)
work in a worker thread, with its own session from a pooled engine, so a slow
disk or database never stalls the event loop that serves every chat. Writes
that can race (two clicks on the same button, one person's first two photos)
rely on the schema's unique constraints: the loser of a race sees the
`IntegrityError`, starts over, and finds the winner's row. A vote that changes
an existing row locks it first (on SQLite every writing transaction takes the
write lock as it begins, see `carbot.db.make_engine`), so two clicks take turns.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Engine, case, delete, distinct, func, or_, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlmodel import Session, col, select

from bots._messages import Sender
from bots._texts import language_for
from carbot import db, metrics
from carbot.db import Feedback, Person, Prediction, utcnow
from carbot.photos import PhotoStore, PhotoStoreError, photo_name
from carbot.settings import normalize_database_url
from worker import Candidate

if TYPE_CHECKING:
    from carbot.settings import Settings

__all__ = ["PredictionRecord", "Store", "StoreUnavailable"]

logger = logging.getLogger(__name__)

VOTES = ("up", "down")
# A transaction that lost a race is run again; the second run sees the winner's row, so two runs are enough.
_ATTEMPTS = 3
# Bound on the parameters of one IN (...): old SQLite builds accept 999.
_IN_CHUNK = 500
# vote("down") leaves an earlier correction in place; correct() replaces it.
_KEEP = object()

T = TypeVar("T")


class StoreUnavailable(RuntimeError):
    """The database cannot be reached or stays locked (down, restarting, past SQLite's busy timeout).

    Nothing was written by the call that raised it; the conversation tells the person to try again.
    """


@dataclass(frozen=True)
class PredictionRecord:
    """A stored prediction as plain data, safe to hand between threads and keep after the session is gone."""

    id: int
    platform: str
    user_id: str
    chat_id: str
    photo_sha256: str
    model_version: str
    top_k: tuple[Candidate, ...]  # as the worker answered it, best first
    created_at: datetime


class Store:
    """People, predictions, feedback and photos for the bots; every method is safe to await from the event loop."""

    def __init__(self, database_url: str, photos: PhotoStore, *, engine: Engine | None = None) -> None:
        """A store on `database_url`, through `engine` if given (`carbot.db.make_engine`'s otherwise)."""
        url = normalize_database_url(database_url)
        if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
            # Every pooled connection (and the migration's) would open its own, empty database.
            raise ValueError("an in-memory SQLite database cannot back the store; give it a file")
        self._database_url = database_url
        self._engine: Engine = engine or db.make_engine(database_url)
        self._reader: Engine = db.read_only(self._engine)
        self.photos = photos

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        """The store the settings describe: `DATABASE_URL` (or SQLite in the data folder) and `<data_dir>/photos`."""
        return cls(settings.sql_url, PhotoStore(settings.photo_dir, settings.photo_retention_days))

    @classmethod
    def open_for_bot(cls, settings: Settings) -> Store:
        """What every bot does at start-up (blocking): the store, its schema brought up to date, expired photos gone."""
        store = cls.from_settings(settings)
        store.migrate()
        store.photos.purge_expired()
        return store

    @property
    def engine(self) -> Engine:
        """The pooled engine, for blocking helpers run in a thread (the retrain records use it)."""
        return self._engine

    def migrate(self) -> None:
        """Bring the schema up to date (blocking; call it once at start-up, before serving)."""
        db.migrate(self._database_url)

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.dispose)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # Predictions.

    async def record_prediction(
        self,
        sender: Sender,
        *,
        message_id: str | None,
        photo: bytes,
        model_version: str,
        top_k: Sequence[Candidate],
        latency_ms: float,
        photo_sent_by: str | None = None,
    ) -> int:
        """Keep a classified photo and the answer given; returns the prediction's id.

        `photo_sent_by`: the platform user id of whoever sent the photo, when that is not the sender (who
        only asked about it: a /top3 reply, Discord's "Identify car"); their /forget deletes it too.
        A photo the disk refuses is logged and skipped: the prediction is recorded anyway.
        """
        # The JSON column's shape, made here once: the worker's answer travels as Candidates up to this point.
        candidates = [{"label": str(c.label), "probability": float(c.probability)} for c in top_k]
        message_id = None if message_id is None else str(message_id)  # Telegram's ids are ints; the column is text
        owner = None
        if photo_sent_by is not None and str(photo_sent_by) != sender.user_id:
            owner = Sender(platform=sender.platform, user_id=str(photo_sent_by), chat_id=sender.chat_id)
        return await asyncio.to_thread(
            self._record_prediction, sender, message_id, photo, model_version, candidates, float(latency_ms), owner
        )

    async def set_reply_message(self, prediction_id: int, reply_message_id: str) -> None:
        """Remember which bot message holds the prediction's buttons."""
        statement = (
            update(Prediction).where(col(Prediction.id) == prediction_id).values(reply_message_id=str(reply_message_id))
        )
        await asyncio.to_thread(self._transaction, lambda session: session.exec(statement))

    async def get_prediction(self, prediction_id: int) -> PredictionRecord | None:
        read = functools.partial(_prediction_record, prediction_id=prediction_id)
        return await asyncio.to_thread(self._transaction, read, True)

    # Feedback.

    async def vote(self, prediction_id: int, sender: Sender, vote: str) -> bool:
        """Record the sender's 👍 ("up") or 👎 ("down"); True if that changed anything.

        One row per prediction and person: a new vote replaces the old one, "up" drops
        a correction, and a repeated click writes nothing. A prediction that no longer
        exists (e.g. its sender was forgotten) changes nothing.
        """
        if vote not in VOTES:
            raise ValueError(f"vote must be 'up' or 'down', not {vote!r}")
        correction = None if vote == "up" else _KEEP
        changed = await asyncio.to_thread(self._transaction, _set_feedback(prediction_id, sender, vote, correction))
        if changed:
            metrics.vote_recorded(sender.platform, vote)
        return changed

    async def correct(self, prediction_id: int, sender: Sender, label: str) -> None:
        """The sender says the photo shows `label` (already checked against the model's labels): a 👎 with a label."""
        if await asyncio.to_thread(self._transaction, _set_feedback(prediction_id, sender, "down", label)):
            metrics.vote_recorded(sender.platform, "correction")

    # People's data.

    async def forget(self, sender: Sender) -> dict:
        """Delete everything about the sender: their votes, their predictions and those others asked about photos
        they sent, the photos nobody else sent, and them.

        Returns counts, {"predictions": n, "votes": n, "photos": n}, and under "photo_hashes" the SHA-256 of
        every photo no prediction refers to any more (the caller removes its copies elsewhere, e.g. in Redis).
        """
        return await asyncio.to_thread(self._forget, sender)

    async def stats(self) -> dict:
        """Counts and the share of 👍 among votes, overall and per model version."""
        return await asyncio.to_thread(self._transaction, _stats, True)

    async def purge_photos(self) -> int:
        """Delete photos past the retention period; returns how many."""
        return await asyncio.to_thread(self.photos.purge_expired)

    # The blocking side, run in worker threads.

    def _transaction(self, work: Callable[[Session], T], read_only: bool = False) -> T:
        """Run `work` in a transaction and commit; run it again if it lost a race on a unique constraint.

        `read_only` work takes no write lock on SQLite: in the write-ahead log it reads a snapshot.

        A database that cannot be reached (or, for SQLite, stays locked past the busy timeout) raises
        `StoreUnavailable`: the transaction was rolled back, so nothing of it is half-written.
        """
        for attempt in range(1, _ATTEMPTS + 1):
            with Session(self._reader if read_only else self._engine, expire_on_commit=False) as session:
                try:
                    result = work(session)
                    session.commit()
                    return result
                except (OperationalError, InterfaceError) as exc:
                    # Leaving the block rolls back (and discards a connection the server dropped).
                    logger.warning("The database is unavailable: %s", exc.orig or exc)
                    raise StoreUnavailable("the database is unavailable right now") from exc
                except IntegrityError:
                    session.rollback()
                    if attempt == _ATTEMPTS:
                        raise
                    logger.debug("Transaction lost a race (attempt %d); running it again", attempt)
        raise AssertionError("unreachable")

    def _record_prediction(
        self,
        sender: Sender,
        message_id: str | None,
        photo: bytes,
        model_version: str,
        top_k: list[dict],
        latency_ms: float,
        owner: Sender | None = None,
    ) -> int:
        sha = photo_name(photo)

        def work(session: Session) -> int:
            person = _person(session, sender)
            prediction = Prediction(
                person_id=person.id,
                photo_sender_id=_person(session, owner).id if owner is not None else None,
                platform=sender.platform,
                chat_id=sender.chat_id,
                message_id=message_id,
                photo_sha256=sha,
                model_version=model_version,
                top_k=top_k,
                latency_ms=latency_ms,
            )
            session.add(prediction)
            session.flush()
            return prediction.id

        # The row first, the file after: a row that cannot be written leaves no file behind that no row
        # (and so no /forget) could ever reach. A file that cannot be written leaves a row without a photo.
        prediction_id = self._transaction(work)
        self._keep_photo(photo)
        return prediction_id

    def _keep_photo(self, photo: bytes) -> None:
        try:
            self.photos.put(photo)
        except PhotoStoreError as exc:
            # The person still gets their answer; only the retraining sample is lost.
            logger.error("Photo not kept for retraining, the prediction is recorded without it: %s", exc)

    def _forget(self, sender: Sender) -> dict:
        counts, photos = self._transaction(lambda session: _delete_person(session, sender))
        # Files go only once the rows are gone for good; a rolled-back forget keeps its photos.
        counts["photos"] = sum(self.photos.delete(sha) for sha in photos)
        counts["photo_hashes"] = sorted(photos)
        return counts


def _set_feedback(prediction_id: int, sender: Sender, vote: str, correction: object) -> Callable[[Session], bool]:
    """A transaction setting the sender's feedback to `vote` and `correction`; it returns whether anything changed."""

    def work(session: Session) -> bool:
        if session.exec(select(Prediction.id).where(Prediction.id == prediction_id)).first() is None:
            return False
        person = _person(session, sender)
        # Locked until commit: a second click waits for the first and then sees what it wrote, so only
        # one of them reports a change (SQLite has no row locks; a writer takes the write lock as it begins).
        row = session.exec(
            select(Feedback)
            .where(Feedback.prediction_id == prediction_id, Feedback.person_id == person.id)
            .with_for_update()
        ).first()
        if row is None:
            new_correction = None if correction is _KEEP else correction
            session.add(
                Feedback(prediction_id=prediction_id, person_id=person.id, vote=vote, correction=new_correction)
            )
            session.flush()  # a concurrent click's row surfaces here, as an IntegrityError
            return True
        new_correction = row.correction if correction is _KEEP else correction
        if (row.vote, row.correction) == (vote, new_correction):
            return False
        row.vote, row.correction, row.updated_at = vote, new_correction, utcnow()
        return True

    return work


def _find_person(session: Session, sender: Sender) -> Person | None:
    return session.exec(
        select(Person).where(Person.platform == sender.platform, Person.platform_user_id == sender.user_id)
    ).first()


def _person(session: Session, sender: Sender) -> Person:
    """The sender's row, created on first contact; the language follows the client's when it says one."""
    person = _find_person(session, sender)
    language = language_for(sender.language_code)
    if person is None:
        person = Person(platform=sender.platform, platform_user_id=sender.user_id, language=language or "en")
        session.add(person)
        session.flush()  # the same person's concurrent first message surfaces here, as an IntegrityError
    elif language and person.language != language:
        person.language = language
    return person


def _prediction_record(session: Session, prediction_id: int) -> PredictionRecord | None:
    row = session.exec(
        select(Prediction, Person.platform_user_id)
        .join(Person, col(Prediction.person_id) == col(Person.id))
        .where(Prediction.id == prediction_id)
    ).first()
    if row is None:
        return None
    prediction, user_id = row
    return PredictionRecord(
        id=prediction.id,
        platform=prediction.platform,
        user_id=user_id,
        chat_id=prediction.chat_id,
        photo_sha256=prediction.photo_sha256,
        model_version=prediction.model_version,
        top_k=tuple(Candidate(label=item["label"], probability=item["probability"]) for item in prediction.top_k),
        created_at=_as_utc(prediction.created_at),
    )


def _as_utc(moment: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; they were written in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _delete_person(session: Session, sender: Sender) -> tuple[dict, set[str]]:
    """Delete the sender's rows; returns the counts and the photos no remaining prediction refers to."""
    person = _find_person(session, sender)
    if person is None:
        return {"predictions": 0, "votes": 0}, set()
    # Their predictions, and other people's predictions about photos they sent (a /top3 reply...).
    theirs = or_(col(Prediction.person_id) == person.id, col(Prediction.photo_sender_id) == person.id)
    photos = set(session.exec(select(Prediction.photo_sha256).where(theirs).distinct()))
    votes = session.exec(delete(Feedback).where(col(Feedback.person_id) == person.id)).rowcount
    # Other people's votes on these predictions go with them (the cascade would too; explicit is clearer).
    session.exec(delete(Feedback).where(col(Feedback.prediction_id).in_(select(Prediction.id).where(theirs))))
    predictions = session.exec(delete(Prediction).where(theirs)).rowcount
    session.exec(delete(Person).where(col(Person.id) == person.id))
    return {"predictions": predictions, "votes": votes}, photos - _photos_in_use(session, photos)


def _photos_in_use(session: Session, photos: Iterable[str]) -> set[str]:
    """Those of `photos` that some prediction still refers to (the same photo, sent by someone else)."""
    photos = sorted(photos)
    in_use: set[str] = set()
    for start in range(0, len(photos), _IN_CHUNK):
        chunk = photos[start : start + _IN_CHUNK]
        in_use.update(session.exec(select(Prediction.photo_sha256).where(col(Prediction.photo_sha256).in_(chunk))))
    return in_use


def _stats(session: Session) -> dict:
    # One statement, so the per-model numbers come from one snapshot even while people keep voting.
    rows = session.exec(
        select(
            Prediction.model_version,
            func.count(distinct(Prediction.id)),
            _count_where(col(Feedback.vote) == "up"),
            _count_where(col(Feedback.vote) == "down"),
            func.count(col(Feedback.correction)),
        )
        .outerjoin(Feedback, col(Feedback.prediction_id) == col(Prediction.id))
        .group_by(Prediction.model_version)
    )
    by_model = {
        version: {"predictions": predictions, "up": int(up), "down": int(down), "corrections": corrections}
        for version, predictions, up, down, corrections in rows
    }
    totals = {
        key: sum(model[key] for model in by_model.values()) for key in ("predictions", "up", "down", "corrections")
    }
    for model in by_model.values():
        model["accuracy_by_feedback"] = _accuracy(model)
    people = session.exec(select(func.count()).select_from(Person)).one()
    return {"people": people, **totals, "accuracy_by_feedback": _accuracy(totals), "by_model": by_model}


def _count_where(condition: Any) -> Any:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _accuracy(tally: dict) -> float | None:
    """The share of 👍 among votes: what people say of the answers, not a measured accuracy."""
    voted = tally["up"] + tally["down"]
    return tally["up"] / voted if voted else None
