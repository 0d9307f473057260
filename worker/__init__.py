"""The RQ side of the system: the batch worker and the client the bots use to reach it.

Bots import only the client and the errors; nothing here imports TensorFlow
until a worker actually loads a model.
"""

from worker._batch_worker import BatchWorker
from worker._client import Candidate, Classification, ClassifyClient, Familiarity, classify_files_sync
from worker._contract import (
    ClassifyError,
    ClassifyFailed,
    ClassifyTimeout,
    JobExpired,
    PhotoRejected,
    QueueBusy,
)
from worker._inference import BatchClassifier, ModelSource
from worker._main import run_worker, worker_running, workers_listening

__all__ = [
    "BatchClassifier",
    "BatchWorker",
    "Candidate",
    "ClassifyClient",
    "ClassifyError",
    "ClassifyFailed",
    "ClassifyTimeout",
    "Familiarity",
    "JobExpired",
    "ModelSource",
    "PhotoRejected",
    "Classification",
    "QueueBusy",
    "classify_files_sync",
    "run_worker",
    "worker_running",
    "workers_listening",
]
