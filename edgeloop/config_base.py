"""Configuration plumbing shared by every edgeloop service.

Each service describes its configuration as pydantic models derived from :class:`StrictModel`
(unknown keys are errors, so a typo in a YAML file fails loudly instead of being ignored). A
configuration comes from one YAML file plus environment overrides; business code receives the
validated model and never reads ``os.environ`` itself.

Environment overrides use a prefix and ``__`` for nesting, e.g. for the agent
``EDGELOOP_AGENT__TRANSPORT__TARGET=10.0.0.5:50051``; values are parsed as YAML scalars, so
``true``, ``12`` and ``0.5`` get their natural types.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are rejected, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(Exception):
    """A configuration file or override is missing, unreadable or invalid; the message says how to fix it."""


def _apply_env(data: dict[str, Any], env: Mapping[str, str], prefix: str) -> dict[str, Any]:
    marker = prefix.upper() + "__"
    for key, raw in sorted(env.items()):
        if not key.upper().startswith(marker):
            continue
        path = [p.lower() for p in key[len(marker) :].split("__") if p]
        if not path:
            continue
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_config(
    model: type[M],
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] | None = None,
    env_prefix: str = "",
    overrides: Mapping[str, Any] | None = None,
) -> M:
    """Load ``model`` from a YAML file, then environment overrides, then explicit ``overrides``.

    Relative paths in the result are taken from the file's folder.

    Raises:
        ConfigError: the file is missing or not YAML, or the result does not validate. The
            message names the file and every invalid field.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"config file {p} does not exist") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
    if env_prefix:
        data = _apply_env(data, os.environ if env is None else env, env_prefix)
    if overrides:
        data = {**data, **overrides}
    try:
        config = model.model_validate(data)
    except ValidationError as err:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid configuration{where}:\n{err}") from err
    if path is not None:
        resolve_relative_paths(config, Path(path).resolve().parent)
    return config


def resolve_relative_paths(model: BaseModel, base: Path) -> None:
    """Make every relative ``Path`` field (recursively) relative to ``base``: paths in a config
    file mean "next to this file", not "next to wherever the service was started"."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            setattr(model, name, base / value)
        elif isinstance(value, BaseModel):
            resolve_relative_paths(value, base)
