"""The client the bots use: submit a photo, await its top-k, without blocking the event loop.

Submitting is two short Redis round trips (queue depth, then photos + jobs in one
transaction) made with RQ's own `Queue.enqueue_call` in a small thread pool; photos
that arrive while others are on their way share them (`_Submitter`). Waiting
is where the time goes, and it needs no thread: one `_ResultListener` per client
reads the result streams RQ writes for each job (`rq:results:<job id>`) with a
single blocking XREAD over all pending jobs, so hundreds of awaits cost one
Redis connection and no polling.

Every connection comes from `carbot.connections.redis_connection`: a Redis that
goes silent (a network that drops packets without closing anything) makes a
command fail after its socket timeout instead of hanging, so a person always
hears back by the request's deadline, and the next photo opens fresh connections.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

import redis
import redis.asyncio as aioredis
from rq import Queue, Retry
from rq.results import Result

from carbot.connections import redis_connection
from carbot.jobs import RedisClock
from carbot.keys import CLASSIFY_FUNC, SERIALIZER, client_wake_key, photo_copies_key, photo_key
from carbot.photos import photo_name
from model import ArtefactCorrupt, ImageRejected, ModelRegistry, Preprocessing, read_artefact, reduce_for_queue
from worker._contract import (
    ClassifyError,
    ClassifyFailed,
    ClassifyTimeout,
    PhotoRejected,
    PhotoRequest,
    QueueBusy,
    RejectReason,
    error_from_exc_string,
    store_photo,
)

log = logging.getLogger(__name__)

# How long one XREAD blocks before the listener looks at its waiters again; results wake it at once.
_LISTEN_BLOCK_MS = 1000
# Consecutive failed XREADs (backing off 0.1 s, 0.2 s, ...) before the waiters are told Redis is gone.
# Each attempt on a silent network lasts the connection's socket timeout (the block + 10 s), so there a
# waiter's own deadline comes first and it hears ClassifyTimeout.
_LISTEN_RETRIES = 5
_UNREACHABLE = "The classifier is unreachable right now; please try again later."
_SEND_FAILED = "Something went wrong while sending the photo; please try again."
_CLOSED = "The classifier client was closed before the photo was sent."
_BUSY = "Too many photos are waiting right now; please try again in a minute."
# Most photos sent to Redis in one transaction. Photos that arrive while the submitting threads are all busy
# go together: one queue-depth read and one transaction for the group instead of two round trips a photo,
# which on a 2-core server took CPU from the model (each round trip costs the client, Redis and the
# context switches between them).
SUBMIT_GROUP = 32


@dataclass(frozen=True)
class Candidate:
    label: str
    probability: float


@dataclass(frozen=True)
class Familiarity:
    """How much a photo looks like the model's training photos (the result's optional "ood" field)."""

    score: float
    threshold: float
    unfamiliar: bool  # the score is above the threshold: probably not a model the classifier knows

    @classmethod
    def from_result(cls, value: object) -> Familiarity | None:
        """The parsed field, or None when it is absent or malformed (the top-k is still worth showing)."""
        if not isinstance(value, dict) or not isinstance(value.get("unfamiliar"), bool):
            return None
        try:
            return cls(float(value["score"]), float(value["threshold"]), value["unfamiliar"])
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Classification:
    """A finished classification: the top-k labels, best first, and the model version that produced them."""

    job_id: str
    model_version: str
    photo_sha256: str  # of the bytes the worker read: for a photo the client reduced, the copy's
    top_k: tuple[Candidate, ...]
    timings: dict = field(default_factory=dict)
    ood: Familiarity | None = None  # None: the model version gives no out-of-distribution verdict
    runtime: str = ""  # the backend that answered (`model.RUNTIMES`); "" from a worker that did not say

    @property
    def unfamiliar(self) -> bool:
        """Whether the photo looks unlike anything the model was trained on."""
        return self.ood is not None and self.ood.unfamiliar

    @classmethod
    def from_result(cls, job_id: str, value: dict) -> Classification:
        return cls(
            job_id=job_id,
            model_version=value["model_version"],
            photo_sha256=value["photo"],
            top_k=tuple(Candidate(c["label"], float(c["probability"])) for c in value["top_k"]),
            timings=value.get("timings", {}),
            ood=Familiarity.from_result(value.get("ood")),
            runtime=str(value.get("runtime", "")),
        )


@dataclass(frozen=True)
class Submission:
    """One photo to classify, as `ClassifyClient.submit_group` takes it."""

    photo: bytes
    top_k: int = 3
    deadline: float | None = None  # unix time on this host's clock; None: no deadline
    original_name: str | None = None  # where `photo` is a copy: the original's name (see `ClassifyClient.classify`)


class ActivePreprocessing:
    """How the active model reads a photo, followed as the registry's active version changes.

    The bots reduce every photo to the active model's input before queueing it; after a
    promotion or a rollback to a model with another input size or other limits, they
    reduce for that one. The registry's pointer (one small file) is read at most every
    `check_s` seconds; until a change is seen (and while the worker swaps its model in)
    the worker resizes what it gets, so a photo is never refused for it, only resized twice.
    """

    DEFAULT_CHECK_S = 5.0

    def __init__(self, registry_dir: Path, *, check_s: float = DEFAULT_CHECK_S) -> None:
        self.registry = ModelRegistry(registry_dir)
        self.check_s = check_s
        self._version: str | None = None
        self._preprocessing = Preprocessing()
        self._checked_at: float | None = None
        self._lock = threading.Lock()  # the client submits from several threads

    def current(self) -> Preprocessing:
        """The active model's preprocessing (the default one while no model can be read)."""
        with self._lock:
            now = time.monotonic()
            if self._checked_at is None or now - self._checked_at >= self.check_s:
                self._checked_at = now
                self._follow()
            return self._preprocessing

    def _follow(self) -> None:
        try:
            version = self.registry.active_version()
            if version == self._version:
                return
            preprocessing = (
                read_artefact(self.registry.path_for(version), verify=False).preprocessing
                if version is not None
                else Preprocessing()
            )
        except (ArtefactCorrupt, OSError, ValueError, KeyError) as exc:
            log.warning("cannot read the active model (%s); using the preprocessing read before, if any", exc)
            return
        if self._version is not None:
            log.info("the active model is now %s: photos are reduced to %d px", version, preprocessing.image_size)
        self._version, self._preprocessing = version, preprocessing


def active_preprocessing(registry_dir: Path) -> Preprocessing:
    """How the active model in `registry_dir` reads a photo (its size limits, its input size), read now.

    With no readable model yet, the preprocessing a model trained now gets.
    """
    return ActivePreprocessing(registry_dir).current()


class ClassifyClient:
    """Submits photos to the `classify` queue and awaits their results.

    Use one per process and close it with `await client.aclose()` (or `async with`).
    """

    def __init__(
        self,
        redis_url: str,
        *,
        queue: str = "classify",
        queue_limit: int = 500,
        timeout_s: float = 30.0,
        job_timeout_s: int = 30,
        retries: int = 2,
        photo_ttl_s: int = 900,
        result_ttl_s: int = 600,
        max_photo_bytes: int | None = None,
        preprocessing: Preprocessing | ActivePreprocessing | None = None,
        submit_threads: int = 4,
    ) -> None:
        self.queue_limit = queue_limit
        self.timeout_s = timeout_s
        self.job_timeout_s = job_timeout_s
        self.retries = retries
        self.photo_ttl_s = photo_ttl_s
        self.result_ttl_s = result_ttl_s
        # None: the limit of the preprocessing, if any; else no check here (the worker checks against its model).
        self._max_photo_bytes = max_photo_bytes
        # Given: photos are queued as the network will see them (`model.reduce_for_queue`), decoded here,
        # off the event loop, so Redis holds and the worker reads a small BMP instead of decoding a phone's JPEG.
        # An `ActivePreprocessing` follows the active model. None: the photo is queued as it came.
        self._preprocessing = preprocessing
        self._sync = redis_connection(redis_url)
        self._queue = Queue(queue, connection=self._sync, serializer=SERIALIZER)
        self._clock = RedisClock(self._sync)
        self._submitter = _Submitter(self.submit_group, threads=submit_threads)
        self._admission = threading.Lock()  # guards the room held by groups on their way (`_reserve_room`)
        self._reserved = 0
        self._listener = _ResultListener(redis_connection(redis_url, asyncio=True, blocking_s=_LISTEN_BLOCK_MS / 1000))

    @classmethod
    def from_settings(cls, settings, redis_url: str) -> ClassifyClient:
        """A client configured by `carbot.settings.Settings`, talking to `redis_url`.

        Photos over the active model's byte limit are refused before anything is queued, and the others
        are queued reduced to what that model reads; both follow the active model as it changes.
        """
        return cls(
            redis_url,
            queue=settings.classify_queue,
            queue_limit=settings.queue_limit,
            timeout_s=settings.request_timeout_s,
            job_timeout_s=settings.job_timeout_s,
            retries=settings.job_retries,
            photo_ttl_s=settings.image_ttl_s,
            result_ttl_s=settings.result_ttl_s,
            preprocessing=ActivePreprocessing(settings.registry_dir),
        )

    def preprocessing_now(self) -> Preprocessing | None:
        """How photos are reduced before they are queued right now (None: they are queued as they came)."""
        if isinstance(self._preprocessing, ActivePreprocessing):
            return self._preprocessing.current()
        return self._preprocessing

    @property
    def max_photo_bytes(self) -> int | None:
        """Photos over this many bytes are refused before anything is queued (None: no limit here)."""
        if self._max_photo_bytes is not None:
            return self._max_photo_bytes
        preprocessing = self.preprocessing_now()
        return preprocessing.max_bytes if preprocessing is not None else None

    async def classify(
        self, photo: bytes, *, top_k: int = 3, timeout_s: float | None = None, original_name: str | None = None
    ) -> Classification:
        """Classify one photo through the queue.

        `original_name`: where `photo` is a smaller copy of a photo (a platform's resized copy), the
        original's name (`carbot.photos.photo_name`): the queued bytes are filed under it, so that
        deleting the original's data reaches them while they wait.

        Raises `PhotoRejected` (the photo's fault; the message is for a person), `QueueBusy`
        (too many photos waiting, nothing submitted), `ClassifyTimeout` (no answer before the
        deadline; the worker will skip the job) or `ClassifyFailed`.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.time() + timeout_s
        job_id = await self._submitter.submit(Submission(photo, top_k, deadline, original_name))
        try:
            result = await asyncio.wait_for(self._listener.wait(job_id), timeout=max(0.0, deadline - time.time()))
        except TimeoutError:
            raise ClassifyTimeout(f"No answer within {timeout_s:g} s; please try again in a minute.") from None
        except (redis.RedisError, OSError) as exc:
            raise ClassifyFailed(_UNREACHABLE) from exc
        if result.type == Result.Type.SUCCESSFUL:
            return Classification.from_result(job_id, result.return_value)
        raise error_from_exc_string(result.exc_string)

    def submit(
        self, photo: bytes, top_k: int = 3, deadline: float | None = None, original_name: str | None = None
    ) -> str:
        """Store one photo and enqueue its job without awaiting the answer (blocking). Returns the job id;
        raises what `classify` raises before its photo is queued."""
        (outcome,) = self.submit_group([Submission(photo, top_k, deadline, original_name)])
        if isinstance(outcome, ClassifyError):
            raise outcome
        return outcome

    def submit_group(self, submissions: Sequence[Submission]) -> list[str | ClassifyError]:
        """Store the photos and enqueue their jobs in one transaction (blocking; `classify` runs this in a thread).

        Returns, for each submission, its job id or the error that photo got: `PhotoRejected` for the
        photo's own fault, `QueueBusy` past the queue limit (the photos beyond the room left) or when
        Redis is full, `ClassifyFailed` when Redis cannot be reached.
        """
        outcomes: list[str | ClassifyError | None] = [self._refusal(submission.photo) for submission in submissions]
        room = 0
        try:
            room = self._reserve_room(sum(outcome is None for outcome in outcomes))
            queued = []
            for index, submission in enumerate(submissions):
                if outcomes[index] is not None:
                    continue
                if room <= len(queued):
                    outcomes[index] = QueueBusy(_BUSY)
                    continue
                # Only now, when it will be queued: a photo refused as "busy" costs no decoding.
                try:
                    queued.append((index, self._reduced(submission.photo)))
                except PhotoRejected as exc:
                    outcomes[index] = exc
                except Exception:  # a decoder bug on some odd file costs that photo only, never its group
                    log.exception("unexpected error reducing a photo")
                    outcomes[index] = PhotoRejected.unreadable()
            if queued:
                with self._sync.pipeline() as pipe:
                    # One transaction: each job and its photo land together (RQ's enqueue must come first).
                    for index, photo in queued:
                        outcomes[index] = self._enqueue(pipe, submissions[index], photo)
                    # The room is given back as the photos fill it: no group reads the queue's length
                    # while they are both in it and held, which would count them twice.
                    with self._admission:
                        pipe.execute()
                        self._reserved -= room
                        room = 0
        except (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError) as exc:
            # Redis at its memory bound (or a replica): no room for the photos, which is "busy", not a crash.
            return [_error_unless_refused(outcome, QueueBusy, _BUSY, exc) for outcome in outcomes]
        except redis.RedisError as exc:
            return [_error_unless_refused(outcome, ClassifyFailed, _UNREACHABLE, exc) for outcome in outcomes]
        finally:
            if room:  # held but not filled: nothing was left to queue, or Redis refused the group
                with self._admission:
                    self._reserved -= room
        return outcomes

    def _reserve_room(self, wanted: int) -> int:
        """Room in the queue for up to `wanted` photos, held for this group until it is queued.

        The client's threads send groups at once: each reading the queue's length alone could
        fill the same room (four groups of three on a limit of 3 queued twelve photos). The room
        held by the groups on their way counts as taken.
        """
        with self._admission:
            room = min(wanted, max(0, self.queue_limit - self._queue.count - self._reserved))
            self._reserved += room
        return room

    def _refusal(self, photo: bytes) -> PhotoRejected | None:
        """Why `photo` is refused before anything of it reaches Redis (empty, too large), or None."""
        if not photo:
            return PhotoRejected("The file is empty.", RejectReason.EMPTY)
        limit = self.max_photo_bytes
        if limit is not None and len(photo) > limit:
            return PhotoRejected(
                f"The file is larger than {limit // 2**20} MB; please send a smaller photo.",
                RejectReason.TOO_LARGE,
            )
        return None

    def _enqueue(self, pipe: redis.client.Pipeline, submission: Submission, queued: bytes) -> str:
        """Queue on `pipe` the job of `submission` and `queued`, the bytes it classifies; returns the job's id."""
        # The worker reads the deadline on Redis's clock: no two hosts need to agree on the time.
        deadline = None if submission.deadline is None else self._clock.from_local(submission.deadline)
        key = photo_key(queued)
        job = self._queue.enqueue_call(
            CLASSIFY_FUNC,
            kwargs=PhotoRequest(photo=key, top_k=submission.top_k, deadline=deadline).to_kwargs(),
            timeout=self.job_timeout_s,
            result_ttl=self.result_ttl_s,
            failure_ttl=self.result_ttl_s,
            # A job nobody picked up before its deadline is of no use to anybody.
            ttl=None if deadline is None else max(1, int(deadline - self._clock.now()) + 60),
            retry=Retry(max=self.retries) if self.retries else None,
            pipeline=pipe,
        )
        store_photo(pipe, queued, self.photo_ttl_s)
        if queued is not submission.photo or submission.original_name is not None:
            # A copy: filed under the original's name too, so /forget reaches it while it waits.
            copies = photo_copies_key(submission.original_name or photo_name(submission.photo))
            pipe.sadd(copies, key)
            pipe.expire(copies, self.photo_ttl_s)
        return job.id

    def _reduced(self, photo: bytes) -> bytes:
        """The photo as the active model reads it (`model.reduce_for_queue`); as it came without a preprocessing."""
        preprocessing = self.preprocessing_now()
        if preprocessing is None:
            return photo
        try:
            return reduce_for_queue(photo, preprocessing)
        except ImageRejected as exc:  # refused here, with the reason the worker would have given
            raise PhotoRejected(str(exc), RejectReason(exc.reason)) from None

    async def aclose(self) -> None:
        await self._listener.aclose()
        self._submitter.close()
        self._sync.close()

    async def __aenter__(self) -> ClassifyClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Submitter:
    """Runs `submit_group` on a few threads; photos that arrive while every thread is busy go together.

    A lone photo is sent at once, on a thread of its own. During a burst each thread, once free,
    takes up to `SUBMIT_GROUP` of the photos waiting, so a hundred photos at once cost a few
    transactions instead of two round trips each, and none waits for more to come.
    """

    def __init__(self, submit_group: Callable[[list[Submission]], list[str | ClassifyError]], *, threads: int) -> None:
        self._submit_group = submit_group
        self._threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="classify-submit")
        self._waiting: deque[tuple[Submission, asyncio.Future]] = deque()
        self._sending = 0  # groups on their way

    async def submit(self, submission: Submission) -> str:
        """Submit one photo; returns its job id or raises its `ClassifyError`."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((submission, future))
        self._send_waiting()
        return await future

    def _send_waiting(self) -> None:
        while self._waiting and self._sending < self._threads:
            group = []
            while self._waiting and len(group) < SUBMIT_GROUP:
                submission, future = self._waiting.popleft()
                if not future.done():  # else its caller gave up while it waited: it is not sent
                    group.append((submission, future))
            if not group:
                return
            self._sending += 1
            sent = asyncio.get_running_loop().run_in_executor(
                self._pool, self._submit_group, [submission for submission, _ in group]
            )
            sent.add_done_callback(functools.partial(self._sent, [future for _, future in group]))

    def _sent(self, futures: list[asyncio.Future], sent: asyncio.Future) -> None:
        self._sending -= 1
        if sent.cancelled():
            outcomes: list = [ClassifyFailed(_CLOSED) for _ in futures]
        elif sent.exception() is not None:  # a bug: each photo of the group hears it, nobody is left waiting
            log.error("submitting %d photos failed", len(futures), exc_info=sent.exception())
            outcomes = [ClassifyFailed(_SEND_FAILED) for _ in futures]
        else:
            outcomes = sent.result()
        for future, outcome in zip(futures, outcomes):
            if future.done():  # its caller gave up meanwhile
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        self._send_waiting()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for _, future in self._waiting:
            if not future.done():
                future.set_exception(ClassifyFailed(_CLOSED))
        self._waiting.clear()


def _error_unless_refused(
    outcome: str | ClassifyError | None, error_type: type[ClassifyError], message: str, cause: BaseException
) -> ClassifyError:
    """A photo's outcome once its group's transaction failed: its own refusal if it had one, else a new error."""
    if isinstance(outcome, ClassifyError):
        return outcome
    error = error_type(message)
    error.__cause__ = cause
    return error


class _ResultListener:
    """Resolves each pending job's future from its RQ result stream, with one XREAD for all of them.

    A job registered while the XREAD is blocked would not be part of it, so
    registering writes to this listener's own "wake" stream, which every XREAD
    also reads: Redis answers the blocked XREAD at once and the next one includes
    the new job.

    The reading task runs while jobs wait and ends when none does, or when it
    fails; the next `wait()` starts a new one. It never ends leaving a waiter
    unanswered: a Redis that stays away, or anything unexpected, fails the
    waiters of that moment with `ClassifyFailed`; on a silent network each
    XREAD lasts its socket timeout, and a waiter's own deadline comes first.
    """

    def __init__(self, connection: aioredis.Redis) -> None:
        self._redis = connection
        self._wake_key = client_wake_key(uuid4().hex)
        self._wake_seen = "0-0"
        self._pending: dict[str, _Pending] = {}  # result stream key -> waiter
        self._task: asyncio.Task | None = None
        self._reading = False  # an XREAD is in flight
        self._woken = False  # ...and a wake-up has already been sent for it
        self._closed = False

    async def wait(self, job_id: str) -> Result:
        key = Result.get_key(job_id)
        pending = _Pending(job_id, asyncio.get_running_loop().create_future())
        self._pending[key] = pending
        try:
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._listen(), name="classify-results")
            elif self._reading and not self._woken:
                self._woken = True
                await self._wake()
            return await pending.future
        finally:
            self._pending.pop(key, None)

    async def _wake(self) -> None:
        """Cut the XREAD in flight short, so the next one includes the job just registered."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1)
                pipe.expire(self._wake_key, 3600)
                await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            # Only a shortcut: without it the job joins the next XREAD, at most _LISTEN_BLOCK_MS later.
            # (A stalled event loop can time this out while Redis is fine; the photo must not fail for it.)
            log.debug("could not wake the result listener: %s", exc)

    async def _listen(self) -> None:
        try:
            await self._read_results()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug, or an answer it cannot read: nobody may be left waiting on a dead task
            log.exception("the result listener stopped; the next photo starts a new one")
            self._fail_all(ClassifyFailed("Something went wrong while waiting for the answer; please try again."), exc)

    async def _read_results(self) -> None:
        failures = 0
        while self._pending and not self._closed:
            streams = {key: pending.last_id for key, pending in self._pending.items()}
            streams[self._wake_key] = self._wake_seen
            self._reading, self._woken = True, False
            try:
                response = await self._redis.xread(streams, block=_LISTEN_BLOCK_MS)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                # redis-py may turn our own cancellation into a TimeoutError (an OSError): that is a stop.
                if self._closed or asyncio.current_task().cancelling():
                    raise
                # A blip (a busy event loop, a reconnect) is retried; a Redis that stays away fails the waiters.
                failures += 1
                log.warning("reading results failed (%s: %s), attempt %d", type(exc).__name__, exc, failures)
                if failures > _LISTEN_RETRIES:
                    self._fail_all(ClassifyFailed(_UNREACHABLE), exc)
                    return
                await asyncio.sleep(0.05 * 2**failures)
                continue
            finally:
                self._reading = False
            failures = 0
            for raw_key, entries in response or []:
                self._deliver(raw_key.decode(), entries)

    def _fail_all(self, error: ClassifyError, cause: BaseException | None = None) -> None:
        error.__cause__ = cause
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)

    def _deliver(self, key: str, entries: Sequence) -> None:
        if key == self._wake_key:
            self._wake_seen = entries[-1][0].decode()
            return
        pending = self._pending.get(key)
        if pending is None:
            return
        for entry_id, payload in entries:
            pending.last_id = entry_id.decode()
            try:
                result = Result.restore(pending.job_id, pending.last_id, payload, connection=None,
                                        serializer=SERIALIZER)  # fmt: skip
            except Exception as exc:  # not what RQ writes: this photo's answer is lost, nobody else's
                log.warning("unreadable result for job %s: %r", pending.job_id, exc)
                del self._pending[key]
                if not pending.future.done():
                    failed = ClassifyFailed("The answer could not be read; please try again.")
                    failed.__cause__ = exc
                    pending.future.set_exception(failed)
                return
            # RETRIED means another attempt is coming: keep waiting for it.
            if result.type != Result.Type.RETRIED:
                del self._pending[key]
                if not pending.future.done():
                    pending.future.set_result(result)
                return

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_all(ClassifyFailed("The classifier client was closed before the answer came."))
        try:
            await self._redis.delete(self._wake_key)  # it expires within the hour anyway
        except (redis.RedisError, OSError) as exc:
            log.debug("could not delete the wake stream: %s", exc)
        await self._redis.aclose()


@dataclass
class _Pending:
    job_id: str
    future: asyncio.Future
    last_id: str = "0-0"


def classify_files_sync(
    client_factory, photos: Sequence[bytes], *, top_k: int = 3
) -> list[Classification | ClassifyError]:
    """Classify `photos` concurrently from synchronous code (the CLI); each entry is a Classification or the error."""

    async def run() -> list[Classification | ClassifyError]:
        async with client_factory() as client:
            outcomes = await asyncio.gather(
                *(client.classify(photo, top_k=top_k) for photo in photos), return_exceptions=True
            )
        for outcome in outcomes:
            if not isinstance(outcome, Classification | ClassifyError):
                raise outcome
        return list(outcomes)

    return asyncio.run(run())
