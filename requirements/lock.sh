#!/bin/sh
# Regenerate the pinned, hashed lock files the Dockerfile installs from (needs `uv`: pip install uv).
# Versions already pinned are kept unless a range in pyproject.toml excludes them; to move one on,
# add `--upgrade-package NAME` (or `--upgrade`) to the commands below. Targets: the images' Python
# (3.11) on x86-64 Linux.
set -eu
cd "$(dirname "$0")/.."
compile() {
    uv pip compile --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
        --no-emit-package carbot "$@"
}
compile pyproject.toml --extra ml -o requirements/cpu.txt
compile pyproject.toml --extra serve -c requirements/cpu.txt -o requirements/serve.txt
compile pyproject.toml requirements/gpu.in -o requirements/gpu.txt
compile requirements/dashboard.in -o requirements/dashboard.txt
compile requirements/build.in -o requirements/build.txt
