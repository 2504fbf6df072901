"""Compose files read as `docker compose -f A -f B ...` reads them (Docker cannot run here): merged in order
(mappings key by key, anything else replaced by the later file) and interpolated with the given variables.

Interpolation follows compose: `$$` is a literal `$`; `${VAR:-default}` takes the default when VAR is unset
or empty; `${VAR:?message}` refuses to start (here: raises MissingVariable) when VAR is unset or empty; a plain
`${VAR}` must be in the variables given (compose would warn and use ""; a test wants to know).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from tests.conftest import ROOT

_REFERENCE = re.compile(r"\$\$|\$\{(\w+)(?::([-?])([^}]*))?\}")


class MissingVariable(ValueError):
    """A `${VAR:?message}` with VAR unset or empty: compose refuses to start with this message."""


def merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: merge(base[k], v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    return override


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(found: re.Match[str]) -> str:
        name, form, text = found.groups()
        if name is None:
            return "$"
        if form is None:
            return env[name]
        if env.get(name):
            return env[name]
        if form == "-":
            return text
        raise MissingVariable(f"required variable {name} is missing a value: {text}")

    return _REFERENCE.sub(replace, value)


def raw(*files: str) -> dict[str, Any]:
    """The files merged, before interpolation."""
    config: dict[str, Any] = {}
    for name in files:
        config = merge(config, yaml.safe_load((ROOT / name).read_text()))
    return config


def load(*files: str, env: Mapping[str, str]) -> dict[str, Any]:
    """The files merged and interpolated with `env`, as compose would run them."""
    return interpolate(raw(*files), env)  # type: ignore[no-any-return]
