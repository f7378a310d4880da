# Two commands: `make run` serves flock, `make test` runs the tests. Both set everything up first (idempotent).
.PHONY: setup run test unit lint bench peer-litellm clean

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/flock serve

# Lint and types first (seconds), then every test: unit, integration (real redis-server and vLLM), deploy.
test: setup lint
	.venv/bin/python -m pytest -ra tests

# The in-process tests only: no vLLM, no Redis, no network; seconds to a few minutes.
unit: setup lint
	.venv/bin/python -m pytest -ra tests/unit

lint:
	.venv/bin/ruff check .
	.venv/bin/mypy

bench: setup
	.venv/bin/flock bench

# The peer for `flock bench --peer litellm`: LiteLLM's proxy in its own .venv-litellm (its pins conflict with
# flock's) and the wrk load generator. Idempotent; not part of setup, since only that bench needs it.
peer-litellm:
	@bash scripts/peer_litellm.sh

clean:
	rm -rf .venv
