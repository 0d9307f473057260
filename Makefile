# The two set-up commands of the README, and a few more. Only Python 3.11+ and pip are needed:
# the first command makes a virtual environment in .venv and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench bench-seeds loadtest faults fuzz sharing worker clean

$(BIN)/carbot: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[ml,dev]'
	@touch $@

demo: $(BIN)/carbot  ## build the demo model if needed, classify generated photos through the queue
	$(BIN)/carbot demo

# Two processes: most tests wait on worker processes, deadlines and heartbeats rather than compute,
# so two of them share two cores well (17 min -> 11 min on the 2-core development machine).
# Every process starts its own Redis; the PostgreSQL tests each make a database of their own.
test: $(BIN)/carbot  ## the whole test suite (starts its own Redis; uses PostgreSQL where a test URL is set)
	$(BIN)/python -m pytest -n 2

lint: $(BIN)/carbot
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The measurement tools (bench/, not part of the product): `$(BIN)/python -m bench --help` lists them all.
bench: $(BIN)/carbot  ## the serving benchmark: ratios measured side by side in one run (the first run also trains its backbone)
	$(BIN)/python -m bench serving --json bench-results.json

loadtest: $(BIN)/carbot  ## many chat users at once through the real conversation, Redis and workers
	$(BIN)/python -m bench loadtest

faults: $(BIN)/carbot  ## the load test with one part broken on purpose, every setting at its default
	$(BIN)/python -m bench faults

fuzz: $(BIN)/carbot  ## mutated pictures through the photo decoder
	$(BIN)/python -m bench fuzz

sharing: $(BIN)/carbot  ## photo latency under a steady load, alone and beside a retrain (yielding off and on)
	$(BIN)/python -m bench sharing

bench-seeds: $(BIN)/carbot  ## train one unseen dataset with five seeds and print each test accuracy (a few minutes)
	$(BIN)/python bench/train_seeds.py --seeds 0 1 2 3 4

worker: $(BIN)/carbot
	$(BIN)/carbot worker

clean:
	rm -rf $(VENV) data bench-results.json
