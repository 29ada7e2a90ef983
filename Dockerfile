# trio_gateway enclave image: nitriding (TLS, attestation, networking) + the gateway.
#
# Reproducible by construction: every input is pinned by content (base images by digest,
# nitriding by full commit, uv by version + PyPI wheel hash, Python packages by uv.lock hashes),
# there are no apt installs, no caches or bytecode are left in layers, and file modes and mtimes
# are normalised to SOURCE_DATE_EPOCH. Build with `make image` (docker buildx with
# rewrite-timestamp=true), check with `make verify-reproducible`. See docs/deployment.md.
#
# Pins and where they came from. None of the digests below could be pulled on the machine this
# file was written on (no registry access there): each was taken from public Dockerfiles that
# use it, and MUST be re-checked before a release with
#   docker buildx imagetools inspect <image>:<tag>
# (the digest printed must equal the one after '@'; a mismatch means a typo or a re-tag, and the
# build then fails closed because a digest cannot be satisfied by different content).
#
# - golang:1.24.13-bookworm@sha256:1a6d4452…: every one of the ten code-search hits for
#   "golang:1.24.13-bookworm@sha256" in public Dockerfiles/scripts carries this digest (some
#   hits may be files of one repository). 1.24.13 is the last release of Go 1.24, so Docker's
#   official image for this tag is no longer rebuilt. nitriding's go.mod asks for go 1.24.0.
# - python:3.12.12-slim-bookworm@sha256:593bd06e…: of the ten code-search hits for
#   "python:3.12.12-slim-bookworm@sha256" in public repositories, five give this full digest,
#   two more its prefix, one a different digest, two none. Official python tags are rebuilt
#   when Debian updates, so other digests for the same tag exist; this one is pinned.
# - nitriding-daemon commit 2b7dfefaee56819681b7f5a4ee8d66a417ad457d: the commit the reference
#   pins ("Merge pull request #128 …/golang.org/x/crypto-0.45.0", 2025-11-27), read from a clone
#   of github.com/brave/nitriding-daemon. Built with its own Makefile target `nitriding`:
#   CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -buildvcs=false.
# - uv 0.13.9: the version that wrote and checks uv.lock in this repository; the sha256 is of
#   uv-0.13.9-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl as downloaded from PyPI
#   and hashed locally. pip refuses any other file (--require-hashes).
#
# The image is linux/amd64 only (the uv wheel hash and the nitriding ARCH are for x86_64).

ARG SOURCE_DATE_EPOCH=1700006400

# ----------------------------------------------------------------------------- nitriding
FROM golang:1.24.13-bookworm@sha256:1a6d4452c65dea36aac2e2d606b01b4a029ec90cc1ae53890540ce6173ea77ac AS nitriding
ARG SOURCE_DATE_EPOCH
ARG NITRIDING_REPO=https://github.com/brave/nitriding-daemon.git
ARG NITRIDING_COMMIT=2b7dfefaee56819681b7f5a4ee8d66a417ad457d
# GOTOOLCHAIN=local: never fetch another Go toolchain; -mod=readonly: go.sum is the lock.
ENV CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly
RUN set -eux; \
    git init -q /src/nitriding; \
    git -C /src/nitriding remote add origin "$NITRIDING_REPO"; \
    git -C /src/nitriding fetch -q --depth 1 origin "$NITRIDING_COMMIT"; \
    git -C /src/nitriding checkout -q --detach FETCH_HEAD; \
    test "$(git -C /src/nitriding rev-parse HEAD)" = "$NITRIDING_COMMIT"; \
    make -C /src/nitriding nitriding ARCH=amd64; \
    install -D -m 0755 /src/nitriding/nitriding /out/nitriding; \
    touch -d "@${SOURCE_DATE_EPOCH}" /out/nitriding /out

# ----------------------------------------------------------------------------- our files
# Staged here so that ownership, modes and mtimes are fixed before they reach the final image
# (the build context's mtimes and umask are the builder's, not ours).
FROM python:3.12.12-slim-bookworm@sha256:593bd06efe90efa80dc4eee3948be7c0fde4134606dd40d8dd8dbcade98e669c AS files
ARG SOURCE_DATE_EPOCH
COPY pyproject.toml uv.lock /stage/app/
COPY trio_gateway /stage/app/trio_gateway
COPY scripts/start.sh /stage/bin/start.sh
RUN set -eu; \
    find /stage -name __pycache__ -prune -exec rm -rf {} +; \
    find /stage -name '*.py[co]' -delete; \
    chown -R 0:0 /stage; \
    find /stage -type d -exec chmod 0755 {} +; \
    find /stage -type f -exec chmod 0644 {} +; \
    chmod 0755 /stage/bin/start.sh; \
    find /stage -exec touch -h -d "@${SOURCE_DATE_EPOCH}" {} +

# ----------------------------------------------------------------------------- runtime
FROM python:3.12.12-slim-bookworm@sha256:593bd06efe90efa80dc4eee3948be7c0fde4134606dd40d8dd8dbcade98e669c
ARG SOURCE_DATE_EPOCH
ARG UV_VERSION=0.13.9
ARG UV_SHA256=d7f459fe4fd247d830351c75686d3996ace3c6f3f728eb0e85a30b7ada0cef19
# nitriding's public name, baked into the image (and so into the PCRs): what the TLS
# certificate is for. NITRIDING_ACME=1 gets a real certificate from Let's Encrypt.
ARG NITRIDING_FQDN=localhost
ARG NITRIDING_ACME=0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/app/.venv/bin:/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    NITRIDING_FQDN=${NITRIDING_FQDN} \
    NITRIDING_ACME=${NITRIDING_ACME}
WORKDIR /app
COPY --from=files /stage/app/pyproject.toml /stage/app/uv.lock /app/
# One layer: fetch uv by hash into a scratch dir, install the locked runtime set (no dev group,
# not the project itself: its code is copied below), then remove uv, caches and bytecode and
# normalise mtimes. site-packages/docs is written by three wheels over each other (eth-abi,
# eth-rlp, hexbytes ship their Sphinx docs as a top-level package) and uv unpacks in parallel,
# so its content would vary between builds; nothing imports it. scripts/verify-reproducible.py
# applies the same removal (PRUNE_SITE_PACKAGES) so its digest describes this tree.
RUN set -eux; \
    printf 'uv==%s --hash=sha256:%s\n' "$UV_VERSION" "$UV_SHA256" > /tmp/uv-requirements.txt; \
    python -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --no-deps --only-binary=:all: --require-hashes --target /tmp/uv-tool \
        -r /tmp/uv-requirements.txt; \
    env UV_PYTHON=/usr/local/bin/python3.12 UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=0 \
        UV_LINK_MODE=copy UV_NO_CACHE=1 UV_PROJECT_ENVIRONMENT=/app/.venv \
        /tmp/uv-tool/bin/uv sync --frozen --no-dev --no-install-project --no-cache; \
    rm -rf /tmp/uv-tool /tmp/uv-requirements.txt "$HOME/.cache" \
        /app/.venv/lib/python3.12/site-packages/docs; \
    find /app/.venv -depth -name __pycache__ -type d -exec rm -rf {} +; \
    find /app/.venv -name '*.py[co]' -delete; \
    find /app /tmp -exec touch -h -d "@${SOURCE_DATE_EPOCH}" {} +
COPY --from=nitriding /out/nitriding /usr/local/bin/nitriding
COPY --from=files /stage/app/trio_gateway /app/trio_gateway
COPY --from=files /stage/bin/start.sh /usr/local/bin/start.sh
# 443: nitriding's public HTTPS; 8000: the gateway (nitriding's backend; the operator's key
# injection through the host's loopback-only forward); 8080: nitriding's enclave-internal API.
EXPOSE 443 8000 8001 8080
# Exec form: in an enclave the Nitro init is PID 1 and runs this as its one child; when it
# exits, the enclave stops. start.sh replaces itself with the gateway (see the script).
CMD ["/usr/local/bin/start.sh"]
