"""Every name the processes share through Redis: its keys, the job functions and the serializer.

Bots, workers, the train worker and `carbot status` meet only in Redis, so the
names they meet under live here, each derived from one prefix (RQ does the same
with `RQ_KEY_PREFIX`). RQ's own keys (queues, registries, results) stay RQ's.
A key that holds a person's data says so, with how long it lives, where it is
written.
"""

from __future__ import annotations

from rq.serializers import JSONSerializer

from carbot.photos import photo_name

PREFIX = "carbot"

# JSON, never pickle: a compromised Redis must not mean code execution on the GPU host.
SERIALIZER = JSONSerializer
# The only functions the workers run, each on its own queue (checked before anything of a job is imported).
CLASSIFY_FUNC = "worker._tasks.classify_photo"
RETRAIN_FUNC = "training._train_worker.run_retrain"
# An admin's decision on a rejected candidate, and /rollback: the train worker is the one process that writes the
# model registry for them (the bots mount it read-only).
DECIDE_FUNC = "training._train_worker.carry_out_decision"
ROLLBACK_FUNC = "training._train_worker.roll_back"

# -- photos on their way through the queue (worker/_contract.py) ---------------------------------------------------
PHOTO_KEY_PREFIX = f"{PREFIX}:photo:"  # + sha256: a photo's bytes, until the last job that needs them ends
PHOTO_REFS_PREFIX = f"{PREFIX}:photo-refs:"  # + sha256: how many jobs still need those bytes
STARTS_KEY_PREFIX = f"{PREFIX}:starts:"  # + job id: a job's starts whose batch has not ended (see BatchWorker)
STATS_KEY = f"{PREFIX}:stats"  # hash of counters the workers keep (batches, photos, expired, ...)
BATCH_SIZES_KEY = f"{PREFIX}:batch-sizes"  # hash: photos in a batch -> how many batches had that many
RUNTIME_KEY = f"{PREFIX}:runtimes"  # hash: worker name -> JSON {version, runtime, reason} it serves


def photo_key(photo: bytes) -> str:
    """The key under which a photo's bytes are stored: its SHA-256, so identical photos share one copy."""
    return PHOTO_KEY_PREFIX + photo_name(photo)


def photo_copies_key(original_sha256: str) -> str:
    """A set: the keys of the reduced copies queued for the original photo with this SHA-256 (/forget finds them)."""
    return f"{PREFIX}:photo-copies:{original_sha256}"


def photo_refs_key(key: str) -> str:
    """The counter of jobs that need the photo stored under `key`."""
    return PHOTO_REFS_PREFIX + key.removeprefix(PHOTO_KEY_PREFIX)


def starts_key(job_id: str) -> str:
    """The counter of a job's starts whose batch has not ended."""
    return STARTS_KEY_PREFIX + job_id


def client_wake_key(client_id: str) -> str:
    """A stream a classify client writes to itself, to wake its own blocking read when a new job is waited for."""
    return f"{PREFIX}:client:{client_id}:wake"


# -- retraining (carbot/retrain_runs.py) ---------------------------------------------------------------------------
RETRAIN_LOCK_KEY = f"{PREFIX}:retrain:lock"  # the run id of the retrain in progress ("pending" while it is queued)
RETRAIN_PROGRESS_KEY = f"{PREFIX}:retrain:progress"  # hash: the running retrain's latest progress
RETRAIN_EVENTS_KEY = f"{PREFIX}:retrain:events"  # stream of run events, read by every bot process
RETRAIN_MESSAGES_KEY = f"{PREFIX}:retrain:messages"  # hash: run id -> the bot message that shows its progress


def decision_unanswered_key(run_id: int) -> str:
    """Set when the bot that took an admin's decision stopped waiting for the train worker to carry it out."""
    return f"{PREFIX}:retrain:decision-unanswered:{run_id}"


# -- the conversation (bots/) --------------------------------------------------------------------------------------
def rate_key(platform: str, user_id: str) -> str:
    """A person's photo count in their current minute (bots/_ratelimit.py)."""
    return f"{PREFIX}:rate:{platform}:{user_id}"


def awaiting_key(platform: str, chat_id: str, user_id: str) -> str:
    """Which prediction this person is typing a correction for, in this chat."""
    return f"{PREFIX}:awaiting:{platform}:{chat_id}:{user_id}"


def last_photo_key(platform: str, chat_id: str) -> str:
    """A hash: the chat's last photo ("photo", its SHA-256 in the photo store) and its sender ("by")."""
    return f"{PREFIX}:last-photo:{platform}:{chat_id}"


def last_photos_of_key(platform: str, user_id: str) -> str:
    """A set: the chats whose last photo this person may have sent (so /forget finds them)."""
    return f"{PREFIX}:last-photos-of:{platform}:{user_id}"
