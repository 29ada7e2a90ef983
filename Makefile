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

## soak: SOAK_MINUTES (30) of paid streams at SOAK_CONCURRENCY (200) with random disconnects
## through ../shared/bench; asserts flat RSS/fds and a ledger that balances on the chain.
## Not part of `make test`. Figures: bench/results/soak-summary.json.
.PHONY: soak
soak: $(BOOT)
	$(PY) bench/soak.py $(ARGS)

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

# ---- deployment and reproducibility (docs/deployment.md) -------------------------------------
IMAGE ?= trio-gateway
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
SOURCE_DATE_EPOCH ?= 1700006400
DEPLOY_OUT ?= build
IMAGE_TAR ?= $(DEPLOY_OUT)/$(IMAGE)-$(IMAGE_TAG).tar
EIF ?= $(DEPLOY_OUT)/$(IMAGE)-$(IMAGE_TAG).eif
NITRIDING_FQDN ?= localhost
NITRIDING_ACME ?= 0
# e.g. BUILDX_FLAGS="--builder repro" for a docker-container builder (see docs/deployment.md)
BUILDX_FLAGS ?=

.PHONY: image eif run-enclave verify-reproducible

## image: the enclave image as a tarball, built reproducibly (buildx, SOURCE_DATE_EPOCH,
## rewrite-timestamp); prints its sha256. NITRIDING_FQDN / NITRIDING_ACME are baked in.
image:
	@docker buildx version >/dev/null 2>&1 || { echo "image: needs docker with buildx (BuildKit >= 0.13)" >&2; exit 1; }
	@mkdir -p $(DEPLOY_OUT)
	SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) docker buildx build $(BUILDX_FLAGS) \
		--platform linux/amd64 --provenance=false --sbom=false \
		--build-arg SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) \
		--build-arg NITRIDING_FQDN=$(NITRIDING_FQDN) --build-arg NITRIDING_ACME=$(NITRIDING_ACME) \
		--output type=docker,name=$(IMAGE):$(IMAGE_TAG),dest=$(IMAGE_TAR),rewrite-timestamp=true .
	@sha256sum $(IMAGE_TAR)

## eif: the EIF from $(IMAGE_TAR) with nitro-cli; fills measurements.txt in if it has no PCRs
## yet (review and commit it), otherwise PCR0/1/2 must equal the committed ones
eif:
	@command -v nitro-cli >/dev/null 2>&1 || { echo "eif: nitro-cli not found (an enclave-enabled EC2 instance with aws-nitro-enclaves-cli)" >&2; exit 1; }
	@test -f $(IMAGE_TAR) || { echo "eif: $(IMAGE_TAR) missing: run make image first" >&2; exit 1; }
	docker load -i $(IMAGE_TAR)
	nitro-cli build-enclave --docker-uri $(IMAGE):$(IMAGE_TAG) --output-file $(EIF) > $(DEPLOY_OUT)/eif-measurements.json
	python3 scripts/verify-reproducible.py pcrs $(DEPLOY_OUT)/eif-measurements.json --measurements measurements.txt

## run-enclave: launch $(EIF) on this EC2 host, forward ports, check PCRs, inject keys from
## .env (scripts/run-enclave.sh; its options in ARGS, e.g. ARGS="--memory 16384")
run-enclave:
	bash scripts/run-enclave.sh $(ARGS) $(EIF)

## verify-reproducible: the locked runtime environment installed twice from nothing must hash
## equal (always runs); then, where a container builder works, the image built twice with
## --no-cache must give the same tarball (otherwise says why that half was skipped)
verify-reproducible: $(BOOT)
	$(PY) scripts/verify-reproducible.py runtime
	@if ! docker info >/dev/null 2>&1; then \
		echo "verify-reproducible: image half SKIPPED: no working container builder here ('docker info' fails: $$(docker info 2>&1 >/dev/null | grep -v '^$$' | tail -n 1))"; \
	elif ! docker buildx version >/dev/null 2>&1; then \
		echo "verify-reproducible: image half SKIPPED: docker has no buildx"; \
	else \
		$(MAKE) --no-print-directory image IMAGE_TAR=$(DEPLOY_OUT)/repro-1.tar BUILDX_FLAGS="$(BUILDX_FLAGS) --no-cache" && \
		$(MAKE) --no-print-directory image IMAGE_TAR=$(DEPLOY_OUT)/repro-2.tar BUILDX_FLAGS="$(BUILDX_FLAGS) --no-cache" && \
		a=$$(sha256sum < $(DEPLOY_OUT)/repro-1.tar | cut -d' ' -f1) && \
		b=$$(sha256sum < $(DEPLOY_OUT)/repro-2.tar | cut -d' ' -f1) && \
		if [ "$$a" = "$$b" ]; then echo "verify-reproducible: image reproducible: sha256:$$a"; \
		else echo "verify-reproducible: image NOT reproducible: $$a != $$b" >&2; exit 1; fi; \
	fi

## audit: known vulnerabilities in uv.lock (committed OSV snapshot + OSV online when reachable);
## exit 1 on findings. ARGS e.g. --runtime-only, --offline. See scripts/audit.py.
.PHONY: audit
audit: $(BOOT)
	$(PY) scripts/audit.py $(ARGS)
