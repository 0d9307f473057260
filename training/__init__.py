"""Training: datasets, the training recipe, evaluation, and the demo model.

What is here so far:

- synthetic photos (:data:`SYNTHETIC_CLASSES`, :func:`synthetic_photo`,
  :func:`synthetic_jpeg`, :func:`make_synthetic_dataset`): classes that differ by
  shape only, so a fresh offline machine has something real to train on;
- datasets (:func:`scan_folder`, :func:`read_manifest`, :func:`check_samples`,
  :func:`stratified_split`, :func:`save_split`, :func:`load_split`,
  :func:`make_tf_dataset`): labelled photos listed, checked, split once and
  streamed to Keras through ``model.load_image`` (TensorFlow is imported only
  when a ``tf.data`` pipeline is made);
- evaluation (:class:`Evaluation`, :func:`evaluate`, :func:`write_report`):
  accuracy, top-3, confusion matrix, per-class precision/recall/F1 (NumPy), and
  the report written into a model artefact (matplotlib, imported when drawing);
- augmentation (:func:`augment_batches`, and its amounts :data:`ROTATION`, :data:`ZOOM`,
  :data:`TRANSLATION`): the recipe's random flips, rotations, zooms and shifts on a ``tf.data`` pipeline;
- the training recipe (:class:`TrainConfig`, :func:`train`): a labelled folder or
  CSV manifest in, a two-phase transfer-learning run (head, then fine-tuning;
  resumable), a model version in the registry out;
- retraining from people's feedback (:class:`FeedbackPhoto`, :func:`is_held_out`,
  :class:`RetrainConfig`, :func:`retrain`): the active model fine-tuned on base data plus
  feedback photos, judged against the active one on a fixed hold-out, promoted only if
  better (``FeedbackPhoto`` and ``is_held_out`` need no TensorFlow);
- hyperparameter search (:class:`SearchSpace`, :func:`tune`): KerasTuner trials that
  are the recipe itself, scored on the validation split (the optional ``tune`` extra);
- photos unlike any class (:data:`UNLIKE_KINDS`, :func:`unlike_photo`, :func:`unlike_photos`:
  scenes, noise, text, textures) on which the out-of-distribution score is measured;
- sharing one machine (:class:`SharingPolicy`, :class:`GiveWay`, :func:`share_machine`,
  :func:`photos_in_progress`, :func:`lower_priority`): a retrain at the lowest CPU priority that
  pauses between training steps while photos wait on the classify queue;
- :func:`build_demo_model`: trains a small classifier on them with :func:`train` and
  puts it in the model registry as version ``demo``.

``import training`` stays light (Pillow and NumPy only): the parts that need
Keras are imported on first use, so a process that only generates data, or a bot
that imports a constant, never loads TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from training._dataset import (
    Sample,
    Split,
    SplitChanged,
    check_samples,
    load_split,
    make_tf_dataset,
    read_manifest,
    save_split,
    scan_folder,
    stratified_split,
)
from training._feedback import FeedbackPhoto, is_held_out
from training._synthetic import SYNTHETIC_CLASSES, make_synthetic_dataset, synthetic_jpeg, synthetic_photo
from training._unlike import UNLIKE_KINDS, unlike_photo, unlike_photos

if TYPE_CHECKING:
    from training._augmentation import ROTATION, TRANSLATION, ZOOM, augment_batches
    from training._demo import build_demo_model
    from training._evaluation import Evaluation, evaluate, write_report
    from training._fine_tune import RetrainConfig, RetrainOutcome, RetrainProgress, retrain
    from training._recipe import TrainConfig, TrainingFailed, train
    from training._sharing import GiveWay, SharingPolicy, lower_priority, photos_in_progress, share_machine
    from training._train_worker import run_train_worker
    from training._tune import MissingExtra, SearchSpace, format_values, keras_tuner, parse_values, train_best, tune

__all__ = [
    "ROTATION",
    "SYNTHETIC_CLASSES",
    "TRANSLATION",
    "ZOOM",
    "Evaluation",
    "FeedbackPhoto",
    "GiveWay",
    "MissingExtra",
    "RetrainConfig",
    "RetrainOutcome",
    "RetrainProgress",
    "Sample",
    "SearchSpace",
    "SharingPolicy",
    "Split",
    "SplitChanged",
    "TrainConfig",
    "TrainingFailed",
    "UNLIKE_KINDS",
    "augment_batches",
    "build_demo_model",
    "check_samples",
    "evaluate",
    "format_values",
    "is_held_out",
    "keras_tuner",
    "load_split",
    "lower_priority",
    "make_synthetic_dataset",
    "make_tf_dataset",
    "photos_in_progress",
    "parse_values",
    "read_manifest",
    "retrain",
    "run_train_worker",
    "save_split",
    "scan_folder",
    "share_machine",
    "stratified_split",
    "synthetic_jpeg",
    "synthetic_photo",
    "train",
    "train_best",
    "tune",
    "unlike_photo",
    "unlike_photos",
    "write_report",
]

# Public name -> private module that defines it and imports Keras (or matplotlib) when used.
_LAZY = {
    "augment_batches": "training._augmentation",
    "ROTATION": "training._augmentation",
    "TRANSLATION": "training._augmentation",
    "ZOOM": "training._augmentation",
    "build_demo_model": "training._demo",
    "Evaluation": "training._evaluation",
    "evaluate": "training._evaluation",
    "write_report": "training._evaluation",
    "TrainConfig": "training._recipe",
    "TrainingFailed": "training._recipe",
    "train": "training._recipe",
    "SearchSpace": "training._tune",
    "tune": "training._tune",
    "train_best": "training._tune",
    "MissingExtra": "training._tune",
    "format_values": "training._tune",
    "keras_tuner": "training._tune",
    "parse_values": "training._tune",
    "run_train_worker": "training._train_worker",  # light: RQ and SQL, no Keras
    "RetrainConfig": "training._fine_tune",
    "RetrainOutcome": "training._fine_tune",
    "RetrainProgress": "training._fine_tune",
    "retrain": "training._fine_tune",
    # Redis and RQ only, but a bot that imports a constant from here needs neither.
    "GiveWay": "training._sharing",
    "SharingPolicy": "training._sharing",
    "lower_priority": "training._sharing",
    "photos_in_progress": "training._sharing",
    "share_machine": "training._sharing",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
