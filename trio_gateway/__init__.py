"""trio_gateway: a verifiable LLM gateway on structured concurrency.

Where things live (arrows point down; codecs import nothing of ours):

    routes/     where a request enters: thin Quart blueprints, validation, dispatch
    api/        the OpenAI wire contract: hand-written pydantic models, error shape, renderers
    relay/      the one place where upstream streams are relayed, timed out and cancelled
    providers/  where providers differ: one adapter per wire format, and the model registry
    signing/    where the enclave key lives: canonical request bytes, keccak, RSA-PSS, nitriding
    codecs/     where bytes are parsed: sans-IO SSE (bytes in, events out, no I/O)
"""

__version__ = "0.1.0"
