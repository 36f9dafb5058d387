"""Name -> builder registry of the model zoo (timm-style).

Each model family lives in its own module and registers its builders with
:func:`register`; :func:`create` looks a name up, validates the common arguments and
records how the model was built in ``model.prunekit_arch`` so a checkpoint can rebuild it.
"""

from __future__ import annotations

import inspect
import json
import numbers
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

from ..errors import ConfigError, ModelError

__all__ = ["create", "list_models", "register"]

Builder = Callable[..., nn.Module]
B = TypeVar("B", bound=Builder)

_REGISTRY: dict[str, Builder] = {}


def _key(name: str) -> str:
    return name.strip().lower()


def register(name: str) -> Callable[[B], B]:
    """Class/function decorator that registers a model builder under ``name``.

    The builder must accept ``num_classes`` and ``in_channels`` as keyword arguments,
    plus any model-specific keyword options (every zoo builder takes ``width``).

    Parameters
    ----------
    name : str
        Registry name (case-insensitive; stored lower-case).

    Returns
    -------
    callable
        A decorator returning the builder unchanged.

    Raises
    ------
    ValueError
        If ``name`` is empty or already registered (a programming error, not a user one).

    Examples
    --------
    >>> @register("tiny")                                     # doctest: +SKIP
    ... def tiny(num_classes=10, in_channels=3, width=1.0):
    ...     return nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.Flatten(), ...)
    """
    key = _key(name)
    if not key:
        raise ValueError("model name must be a non-empty string")

    def decorator(builder: B) -> B:
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Return the registered model names, sorted.

    Returns
    -------
    list of str
    """
    return sorted(_REGISTRY)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


def _options(builder: Builder) -> list[str]:
    """Keyword options a builder accepts besides ``num_classes`` / ``in_channels``."""
    params = inspect.signature(builder).parameters.values()
    return [p.name for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in ("num_classes", "in_channels")]


def create(name: str, num_classes: int = 10, in_channels: int = 3, *,
           kwargs: Mapping[str, Any] | None = None, **kw: Any) -> nn.Module:
    """Build a registered model.

    Parameters
    ----------
    name : str
        Model name, one of :func:`list_models` (case-insensitive).
    num_classes : int, default 10
        Number of outputs of the final ``nn.Linear``.
    in_channels : int, default 3
        Channels of the input images (3 for CIFAR, 1 for Fashion-MNIST).
    kwargs : mapping, optional
        Model options given as one mapping; merged with ``**kw``. This makes
        ``create(**model.prunekit_arch)`` rebuild a model.
    **kw
        Model options, e.g. ``width=0.5``; ``simplecnn`` also takes ``input_size``.
        Values must be JSON-serialisable.

    Returns
    -------
    torch.nn.Module
        The freshly initialised model. It carries a plain attribute ``prunekit_arch``:
        ``{"name", "num_classes", "in_channels", "kwargs"}``, all JSON-serialisable.

    Raises
    ------
    ModelError
        If ``name`` is not registered (the message lists the available names).
    ConfigError
        If ``num_classes`` or ``in_channels`` is not an integer >= 1, an option is unknown
        to the model, or an option has a bad value.

    Examples
    --------
    >>> from prunekit.models import create
    >>> model = create("resnet20", num_classes=10, in_channels=1)
    >>> model.prunekit_arch["name"]
    'resnet20'
    """
    if not isinstance(name, str) or _key(name) not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    key = _key(name)
    num_classes = _positive_int(num_classes, "num_classes")
    in_channels = _positive_int(in_channels, "in_channels")

    options: dict[str, Any] = dict(kwargs or {})
    for k, v in kw.items():
        if k in options and options[k] != v:
            raise ConfigError(f"model option {k!r} given twice with different values")
        options[k] = v

    builder = _REGISTRY[key]
    accepted = _options(builder)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"model {key!r} does not accept option(s) {', '.join(map(repr, unknown))}; "
                          f"accepted: {', '.join(accepted) or 'none'}")
    try:
        json.dumps(options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model options must be JSON-serialisable, got {options!r}") from exc

    model = builder(num_classes=num_classes, in_channels=in_channels, **options)
    model.prunekit_arch = {"name": key, "num_classes": num_classes,
                           "in_channels": in_channels, "kwargs": options}
    return model
