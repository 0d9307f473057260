"""A bot process must start in about a second: its import path never loads TensorFlow or Keras."""

from __future__ import annotations

import subprocess
import sys


def test_bot_facing_import_path_does_not_import_tensorflow():
    code = (
        "import sys, bots, worker, carbot.cli, carbot.settings, carbot.services, carbot.cli._status\n"
        "from worker import ClassifyClient, PhotoRejected, QueueBusy\n"
        "from model import load_image, ModelRegistry\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'jax', 'torch'))\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
