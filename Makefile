# Two commands: `make run` serves flock, `make test` runs the tests. Both set everything up first (idempotent).
.PHONY: setup run test unit bench clean

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/flock serve

test: setup
	.venv/bin/python -m pytest -ra tests

unit: setup
	.venv/bin/python -m pytest -ra tests/unit

bench: setup
	.venv/bin/flock bench

clean:
	rm -rf .venv
