"""Loads the model table (``models.toml``), validated at start-up, and resolves names."""

from __future__ import annotations

import tomllib
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any

from .base import ModelInfo

_FIELDS = {"provider", "upstream", "input_usd", "output_usd", "aliases", "fixed_temperature"}
_FIELDS |= {"context", "max_output", "dev_only", "mode", "image_usd", "thinking_budget"}
_MODES = {"chat", "image_output", "image_generation"}


class RegistryError(ValueError):
    pass


def _row(name: str, row: dict[str, Any]) -> ModelInfo:
    unknown = set(row) - _FIELDS
    if unknown:
        raise RegistryError(f"model {name!r}: unknown fields {sorted(unknown)}")
    for price in ("input_usd", "output_usd"):
        try:
            if Decimal(str(row[price])) < 0:
                raise RegistryError(f"model {name!r}: {price} is negative")
        except (KeyError, InvalidOperation) as exc:
            raise RegistryError(f"model {name!r}: {price} must be a decimal string") from exc
    if row.get("mode", "chat") not in _MODES:
        raise RegistryError(f"model {name!r}: mode must be one of {sorted(_MODES)}")
    if row.get("mode", "chat") == "image_generation" and "image_usd" not in row:
        raise RegistryError(f"model {name!r}: image_generation models need image_usd")
    try:
        return ModelInfo(
            name=name,
            provider=str(row["provider"]),
            upstream=str(row["upstream"]),
            input_usd=str(row["input_usd"]),
            output_usd=str(row["output_usd"]),
            fixed_temperature=row.get("fixed_temperature"),
            context=row.get("context"),
            max_output=row.get("max_output"),
            dev_only=bool(row.get("dev_only", False)),
            mode=row.get("mode", "chat"),
            image_usd=str(row["image_usd"]) if "image_usd" in row else None,
            thinking_budget=row.get("thinking_budget"),
        )
    except KeyError as exc:
        raise RegistryError(f"model {name!r}: missing field {exc}") from exc


class ModelRegistry:
    def __init__(self, models: dict[str, ModelInfo], aliases: dict[str, str]) -> None:
        self._models = models
        self._lookup = {k.lower(): v for k, v in aliases.items()}
        self._lookup.update({k.lower(): k for k in models})

    @classmethod
    def from_toml(cls, text: str, *, providers: set[str], dev: bool) -> ModelRegistry:
        data = tomllib.loads(text)
        models: dict[str, ModelInfo] = {}
        aliases: dict[str, str] = {}
        for name, row in (data.get("models") or {}).items():
            info = _row(name, row)
            if info.provider not in providers:
                raise RegistryError(f"model {name!r}: unknown provider {info.provider!r}")
            if info.dev_only and not dev:
                continue
            models[name] = info
            for alias in row.get("aliases") or ():
                if alias.lower() in aliases or alias in models:
                    raise RegistryError(f"alias {alias!r} is used twice")
                aliases[alias] = name
        return cls(models, aliases)

    @classmethod
    def load_default(cls, *, providers: set[str], dev: bool) -> ModelRegistry:
        text = resources.files(__package__).joinpath("models.toml").read_text("utf-8")
        return cls.from_toml(text, providers=providers, dev=dev)

    def resolve(self, name: str) -> ModelInfo | None:
        key = self._lookup.get(name.strip().lower())
        return self._models[key] if key is not None else None

    def __iter__(self) -> Any:
        return iter(self._models.values())
