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

# Both builds (proxy/_native.py): everything against the compiled one (checked to be the one
# that runs wherever the machine can compile), then the unit tests once more with
# PGSEAL_PURE=1.
test:
	@scripts/bootstrap.sh test
	PGSEAL_EXPECT_COMPILED=1 $(PY) -m pytest $(PYTEST_ARGS)
	PGSEAL_PURE=1 $(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

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
	rm -rf .pgseal .pytest_cache build *.egg-info proxy/_compiled.json
	find proxy -name '*.so' -delete
