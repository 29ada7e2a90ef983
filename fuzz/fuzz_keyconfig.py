"""``application/ohttp-keys`` (RFC 9458 §3): ``decode_key_configs`` on arbitrary bytes.

Only ``MalformedKeyConfig`` may escape. A list that decodes to at least one usable (X25519)
config must re-encode and decode to the same configs.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["trio_gateway"]):
    from trio_gateway.codecs.ohttp import (
        KEM_X25519,
        MalformedKeyConfig,
        decode_key_configs,
        encode_key_configs,
    )


def TestOneInput(data: bytes) -> None:
    try:
        configs = decode_key_configs(data)
    except MalformedKeyConfig:
        return
    for config in configs:
        assert config.kem_id == KEM_X25519 and len(config.public_key) == 32
        assert config.suites and 0 <= config.key_id <= 0xFF
    if configs:
        wire = encode_key_configs(configs)
        assert decode_key_configs(wire) == configs
        if len(wire) == len(data):  # no foreign config was skipped: the encoding is canonical
            assert wire == data


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
