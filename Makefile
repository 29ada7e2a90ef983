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

## bench-paid: paid (open x402 session) vs unpaid overhead with ../shared/bench (N, C, ROUNDS)
.PHONY: bench-paid
bench-paid: $(BOOT)
	bash bench/paid.sh

## fuzz: every atheris harness in fuzz/ in parallel for FUZZ_SECONDS each (default 60), niced;
## prints runs per harness and the total. Crashes land in fuzz/crashes/<harness>/ (git-ignored).
fuzz: $(BOOT)
	FUZZ_SECONDS=$(or $(FUZZ_SECONDS),60) PY=$(PY) bash fuzz/run.sh

## fuzz-smoke: the CI smoke (>= 100 000 executions across harnesses), also part of `make test`
.PHONY: fuzz-smoke
fuzz-smoke: $(BOOT)
	$(PY) -m pytest tests/test_fuzz_smoke.py -v $(ARGS)

clean:
	rm -rf .venv bench/results
