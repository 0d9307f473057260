"""The RQ side of the system: the batch worker and the client the bots use to reach it.

Bots import the client, the errors and, in the embedded mode, `worker_running` (which starts
`carbot worker` as a child process); nothing here imports TensorFlow until a worker actually
loads a model.
"""

from worker._batch_worker import BatchWorker
from worker._client import (
    ActivePreprocessing,
    Candidate,
    Classification,
    ClassifyClient,
    Familiarity,
    Submission,
    active_preprocessing,
    classify_files_sync,
)
from worker._contract import (
    ClassifyError,
    ClassifyFailed,
    ClassifyTimeout,
    JobExpired,
    PhotoRejected,
    QueueBusy,
    RejectReason,
)
from worker._inference import BatchClassifier, ModelSource
from worker._main import run_worker, worker_running, workers_listening

__all__ = [
    "BatchClassifier",
    "BatchWorker",
    "Candidate",
    "ActivePreprocessing",
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
    "RejectReason",
    "Submission",
    "active_preprocessing",
    "classify_files_sync",
    "run_worker",
    "worker_running",
    "workers_listening",
]
