# The two commands a newcomer needs: `make run` and `make test`. Everything else builds on them.
SHELL := /bin/bash
PY := .venv/bin/python
BOOT := .venv/.bootstrapped

.PHONY: run test lint bench fuzz clean

$(BOOT): pyproject.toml uv.lock scripts/bootstrap.sh
	@bash scripts/bootstrap.sh
	@touch $@

## run: the gateway on 127.0.0.1:8000 with the embedded mock model and a fresh dev key
run: $(BOOT)
	$(PY) -m trio_gateway --dev $(ARGS)

## test: the whole suite (-W error; real sockets on loopback)
test: $(BOOT)
	$(PY) -m pytest $(ARGS)

## lint: ruff (format + check) and mypy --strict
lint: $(BOOT)
	.venv/bin/ruff format --check trio_gateway tests
	.venv/bin/ruff check trio_gateway tests
	.venv/bin/mypy trio_gateway

## bench: mock provider + gateway + ../shared/bench scenarios (results in bench/results/)
bench: $(BOOT)
	bash bench/run.sh

## fuzz: placeholder until the OHTTP issue lands its atheris harnesses
fuzz:
	@echo "fuzz: no harnesses yet (OHTTP issue)"; exit 1

clean:
	rm -rf .venv bench/results
