"""The job contract between the bots' client and the worker.

One RQ job per photo on queue `classify`, serialised as JSON (never pickle: a
compromised Redis must not mean code execution on the GPU host). The photo's
bytes are stored once in Redis under their SHA-256 with a TTL; the job carries
the key and small keyword arguments:

    classify_photo(photo="carbot:photo:<sha256>", top_k=3, deadline=<unix time>)

The result is JSON too:

    {"model_version": "v3", "runtime": "openvino-int8", "photo": "<sha256>",
     "top_k": [{"label": "FIAT ARGO", "probability": 0.91}, ...],
     "timings": {"queue_ms": .., "decode_ms": .., "inference_ms": .., "batch_size": ..},
     "ood": {"score": 0.93, "threshold": 1.8, "unfamiliar": false}}

"runtime" names the backend that ran the forward pass (`model.RUNTIMES`): a version's
variants are verified to agree with it, and this says which one answered.
"ood" is there when the model version has an out-of-distribution score: "unfamiliar"
means the photo looks unlike the photos the model was trained on (a score above the
threshold calibrated at training time). Results without "runtime" or "ood" (older workers
or models) stay valid.

A job that fails records an `exc_string` whose last line is `<ErrorName>: <message>`;
for the errors below the message is meant for a person and the job is not retried. A
rejected photo's message starts with its reason code (`PhotoRejected: not_an_image: This
file is...`, one of `RejectReason`), so the bots can say why in the person's language.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from carbot.keys import PHOTO_KEY_PREFIX, photo_key, photo_refs_key

if TYPE_CHECKING:
    from redis.client import Pipeline

_SHA256 = re.compile(r"[0-9a-f]{64}")

# The last job to end deletes the photo's bytes (its TTL is only the backstop of a job nobody ran).
_RELEASE_PHOTO = """
local left = redis.call('DECR', KEYS[2])
if left <= 0 then redis.call('DEL', KEYS[1], KEYS[2]) end
return left
"""


def store_photo(pipeline: Pipeline, photo: bytes, ttl_s: int) -> str:
    """Store `photo` for one more job (queued on `pipeline`); returns its key. Identical photos share one copy."""
    key = photo_key(photo)
    pipeline.set(key, photo, ex=ttl_s)
    pipeline.incr(photo_refs_key(key))
    pipeline.expire(photo_refs_key(key), ttl_s)
    return key


def release_photo(pipeline: Pipeline, key: str) -> None:
    """A job that needed the photo under `key` has ended: the last one deletes its bytes (queued on `pipeline`)."""
    pipeline.eval(_RELEASE_PHOTO, 2, key, photo_refs_key(key))


@dataclass(frozen=True)
class PhotoRequest:
    """The keyword arguments of a classify job, checked."""

    photo: str  # the Redis key of the photo's bytes
    top_k: int = 3
    deadline: float | None = None  # unix time after which nobody waits for the answer

    @classmethod
    def from_kwargs(cls, kwargs: object) -> PhotoRequest:
        """Read a job's kwargs; anything malformed is an `InvalidJob` for that job alone."""
        try:
            request = cls(
                photo=str(kwargs["photo"]),
                top_k=int(kwargs.get("top_k", 3)),
                deadline=None if kwargs.get("deadline") is None else float(kwargs["deadline"]),
            )
        except (TypeError, KeyError, ValueError, AttributeError):
            raise InvalidJob("This request was malformed and cannot be classified.") from None
        digest = request.photo.removeprefix(PHOTO_KEY_PREFIX)
        if request.photo == digest or not _SHA256.fullmatch(digest) or not 1 <= request.top_k <= 100:
            raise InvalidJob("This request was malformed and cannot be classified.")
        return request

    def to_kwargs(self) -> dict:
        return {"photo": self.photo, "top_k": self.top_k, "deadline": self.deadline}

    @property
    def digest(self) -> str:
        return self.photo.removeprefix(PHOTO_KEY_PREFIX)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


class RejectReason(StrEnum):
    """Why a photo was rejected: a code that travels with the rejection, translated where a person reads it."""

    EMPTY = "empty"
    TOO_LARGE = "too_large"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    TOO_MANY_PIXELS = "too_many_pixels"
    UNSUPPORTED = "unsupported"
    UNREADABLE = "unreadable"  # the decoder failed in a way it does not name
    EXPIRED = "expired"  # the photo's bytes were gone from Redis before the job ran
    QUARANTINED = "quarantined"  # it was in a batch that stopped the worker twice


class ClassifyError(Exception):
    """Base of the errors a caller of the classifier can get."""

    outcome = "failed"  # how the worker's metrics count a job that ends with this error


class PhotoRejected(ClassifyError):
    """The photo cannot be classified (not an image, corrupt, too large...); `reason` says why, `message` too.

    `str()` is the wire form, `<reason>: <message>`, which a failed job's `exc_string` carries to the client.
    """

    outcome = "rejected"

    def __init__(self, message: str, reason: RejectReason | None = None) -> None:
        self.message = message
        self.reason = reason
        super().__init__(message if reason is None else f"{reason.value}: {message}")

    def __reduce__(self) -> tuple:
        return (type(self), (self.message, self.reason))

    @classmethod
    def unreadable(cls) -> PhotoRejected:
        """A picture that a decoder failed on in a way it does not name (a bug of its, on some odd file)."""
        return cls("This picture could not be read; please send it as a JPEG or PNG.", RejectReason.UNREADABLE)

    @classmethod
    def from_wire(cls, text: str) -> PhotoRejected:
        """The error a failed job's `<reason>: <message>` describes (a message without a known code keeps none)."""
        code, separator, message = text.partition(": ")
        if separator and code in RejectReason.__members__.values():
            return cls(message, RejectReason(code))
        return cls(text)


class JobExpired(ClassifyError):
    """The job waited past its deadline and was not computed."""

    outcome = "expired"

    def __init__(self, message: str = "The photo waited too long in the queue; please send it again.") -> None:
        super().__init__(message)


class InvalidJob(ClassifyError):
    """The job's arguments do not follow this contract (a foreign or corrupted job)."""

    outcome = "invalid"


class ClassifyFailed(ClassifyError):
    """The classifier failed for a reason that is not the photo's fault."""


class QueueBusy(ClassifyError):
    """Too many photos are waiting: the photo was not submitted; try again in a minute."""


class ClassifyTimeout(ClassifyError):
    """No answer came before the request's deadline; the worker will not compute the photo any more."""


def outcome_of(exc: BaseException) -> str:
    """How the worker's metrics count a job that ended with `exc` ("failed" for anything unexpected)."""
    return exc.outcome if isinstance(exc, ClassifyError) else "failed"


# Errors that are the input's fault: retrying them cannot help.
FINAL_ERRORS = {cls.__name__: cls for cls in (PhotoRejected, JobExpired, InvalidJob)}

_LAST_LINE = re.compile(r"^(?:[\w.]+\.)?(?P<name>\w+): (?P<message>.*)$")


def error_from_exc_string(exc_string: str | None) -> ClassifyError:
    """Turn a failed job's `exc_string` back into the error the caller should see."""
    lines = [line for line in (exc_string or "").strip().splitlines() if line.strip()]
    match = _LAST_LINE.match(lines[-1]) if lines else None
    if match and match["name"] == PhotoRejected.__name__:
        return PhotoRejected.from_wire(match["message"])
    if match and match["name"] in FINAL_ERRORS:
        return FINAL_ERRORS[match["name"]](match["message"])
    return ClassifyFailed("The classifier failed on this photo; please try again later.")
