# pgseal: `make run` starts the demo, `make test` runs every test.
# Both install what is missing first (scripts/bootstrap.sh).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: run test unit lint bench bootstrap clean

bootstrap:
	@scripts/bootstrap.sh run

run:
	@scripts/bootstrap.sh run
	$(PY) -m proxy demo

test:
	@scripts/bootstrap.sh test
	$(PY) -m pytest $(PYTEST_ARGS)

unit:
	@scripts/bootstrap.sh test
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lint:
	@scripts/bootstrap.sh test
	.venv/bin/ruff check proxy tests bench
	.venv/bin/mypy

bench:
	@scripts/bootstrap.sh bench
	$(PY) -m bench

clean:
	rm -rf .pgseal .pytest_cache build *.egg-info
