"""Where the enclave key lives: canonical request bytes, keccak hashes, RSA-PSS, nitriding."""
