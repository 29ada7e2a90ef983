"""The OpenAI wire contract: hand-written pydantic models, the error shape, chunk renderers."""
