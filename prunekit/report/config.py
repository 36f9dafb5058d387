"""The YAML configuration file of ``prunekit compare --config FILE``.

Its keys are the command's options (``target_macs`` or ``target-macs`` alike); values given on
the command line override the file's. Unknown keys and values of the wrong type are a
:class:`~prunekit.errors.ConfigError` that names them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["CONFIG_KEYS", "read_config", "parse_methods"]

_NUMBER, _INT, _STR, _BOOL = "a number", "an integer", "a string", "true or false"

#: Accepted keys and the kind of value each takes.
CONFIG_KEYS: dict[str, str] = {
    "methods": "a list of method names or a comma-separated string",
    "target_macs": _NUMBER, "ratio": _NUMBER, "finetune_epochs": _INT, "finetune_lr": _NUMBER,
    "report": _STR, "data": _STR, "data_dir": _STR, "train_samples": _INT, "calib_images": _INT,
    "distill": _BOOL, "onnx": _BOOL, "seed": _INT, "device": _STR, "latency_seconds": _NUMBER,
    "threads": _INT, "method_options": "a mapping of method name -> {option: value}",
}


def parse_methods(value: Any, where: str = "methods") -> list[str]:
    """A list of method names from a list or a comma-separated string (blanks dropped)."""
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = [v.strip() for v in value]
    else:
        raise ConfigError(f"{where} must be {CONFIG_KEYS['methods']}, got {value!r}")
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"{where} lists no method")
    return names


def _check(key: str, value: Any) -> Any:
    kind = CONFIG_KEYS[key]
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {
        _NUMBER: is_num,
        _INT: is_num and float(value).is_integer(),
        _STR: isinstance(value, str) and value != "",
        _BOOL: isinstance(value, bool),
    }.get(kind)
    if key == "methods":
        return parse_methods(value, "config key 'methods'")
    if key == "method_options":
        if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and isinstance(v, Mapping) for k, v in value.items()):
            raise ConfigError(f"config key 'method_options' must be {kind}, got {value!r}")
        return {k: dict(v) for k, v in value.items()}
    if not ok:
        raise ConfigError(f"config key {key!r} must be {kind}, got {value!r}")
    return int(value) if kind == _INT else value


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The validated content of a compare config file.

    Parameters
    ----------
    path : path
        A YAML file holding one mapping (an empty file is an empty mapping).

    Returns
    -------
    dict
        Option name (``_`` spelling) -> value; ``methods`` as a list.

    Raises
    ------
    ConfigError
        Missing or unreadable file, invalid YAML, not a mapping, unknown keys (all named),
        a value of the wrong type.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {p} must hold a mapping of option: value, "
                          f"got {type(data).__name__}")
    out: dict[str, Any] = {}
    unknown = []
    for raw, value in data.items():
        key = str(raw).replace("-", "_")
        if key not in CONFIG_KEYS:
            unknown.append(str(raw))
            continue
        if key in out:
            raise ConfigError(f"config file {p} sets {key!r} twice")
        out[key] = _check(key, value)
    if unknown:
        raise ConfigError(f"unknown key(s) in config file {p}: {', '.join(sorted(unknown))}; "
                          f"accepted: {', '.join(CONFIG_KEYS)}")
    return out
