"""Model specs: build a model from a short string, and load plain weights into it.

A spec names where a model comes from:

* ``zoo:NAME`` (or a bare ``NAME``): a prunekit zoo model, :func:`prunekit.models.create`;
* ``path/to/file.py:FUNC``: a factory function (or class) in a Python file;
* ``package.module:FUNC``: a factory in an importable module.

The factory is called with no arguments, plus ``num_classes`` when one is given and the
factory accepts it; it must return an ``nn.Module``. The file or module is imported only
because it was named: building from a spec runs that code.

``torchvision:NAME``, ``timm:NAME`` and ``hf:TYPE`` are recognised but not built yet.

>>> from prunekit.models.spec import build
>>> model = build("zoo:resnet20", num_classes=10)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, ModelError

__all__ = ["build", "canonical", "load_weights"]

_PACKAGES = {"torchvision": "torchvision", "timm": "timm", "hf": "transformers"}


def _split(spec: str) -> tuple[str, str, str]:
    """``(kind, source, name)``: kind is ``zoo``, ``file``, ``module`` or a package prefix."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"a model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    head, sep, tail = spec.partition(":")
    if sep and head.lower() == "zoo":
        return "zoo", "", tail
    if sep and head.lower() in _PACKAGES:
        return head.lower(), "", tail
    if ":" not in spec:
        return "zoo", "", spec
    source, _, name = spec.rpartition(":")  # rpartition: a Windows drive letter stays in source
    if not source or not name:
        raise ConfigError(f"bad model spec {spec!r}: expected zoo:NAME, path/to/file.py:FUNC "
                          "or package.module:FUNC")
    is_file = source.endswith(".py") or "/" in source or os.sep in source
    return ("file" if is_file else "module"), source, name


def names_code(spec: str) -> bool:
    """Whether building ``spec`` imports and runs code it names (a factory ``file.py:FUNC`` or
    ``package.module:FUNC``), as opposed to a model of the zoo or of an installed library."""
    return _split(spec)[0] in ("file", "module")


def canonical(spec: str) -> str:
    """``spec`` with a factory file made absolute (what a checkpoint records, so that it is
    rebuilt from any working directory)."""
    kind, source, name = _split(spec)
    if kind == "file":
        return f"{Path(source).expanduser().resolve()}:{name}"
    return spec.strip()


def _import_file(path: str) -> Any:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"model file not found: {p}" if not p.exists()
                          else f"model file is not a file: {p}")
    resolved = p.resolve()
    mod_name = "prunekit_user_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot import model file {p} (not a Python file?)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    sys.path.insert(0, str(resolved.parent))  # the file may import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise ModelError(f"importing {p} failed: {type(e).__name__}: {e}") from None
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(resolved.parent))
    return module


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.split(".")[0] == e.name.split(".")[0] and name.startswith(e.name):
            raise ConfigError(f"model module {name!r} not found (a file needs a path ending in "
                              ".py, e.g. ./net.py:make_net)") from None
        raise ModelError(f"importing {name} failed: {type(e).__name__}: {e}") from None
    except Exception as e:
        raise ModelError(f"importing {name} failed: {type(e).__name__}: {e}") from None


def _call_factory(fn: Any, where: str, num_classes: int | None, kw: dict[str, Any]) -> nn.Module:
    kwargs = dict(kw)
    if num_classes is not None:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        if "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs["num_classes"] = num_classes
    try:
        model = fn(**kwargs)
    except Exception as e:
        text = " ".join(str(e).split())
        raise ModelError(f"model factory {where} raised {type(e).__name__}: {text}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {where} returned a value of type {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


def build(spec: str, num_classes: int | None = None, **kw: Any) -> nn.Module:
    """Build the model a spec names.

    Parameters
    ----------
    spec : str
        ``zoo:NAME`` (or ``NAME``), ``path/to/file.py:FUNC`` or ``package.module:FUNC``.
    num_classes : int, optional
        Passed to a zoo model, and to a factory that accepts ``num_classes`` (or ``**kwargs``);
        ``None`` keeps the model's own default.
    **kw
        Further keyword arguments for the zoo model or the factory.

    Returns
    -------
    nn.Module
        The fresh model, with ``model.prunekit_spec = {"spec", "num_classes", "kwargs"}`` (the
        spec with a factory file made absolute) when it came from a factory.

    Raises
    ------
    ConfigError
        A bad spec, a missing file or module, a missing function, a package to install.
    ModelError
        Importing the code failed, the factory raised, or it returned no ``nn.Module``.
    """
    kind, source, name = _split(spec)
    if kind == "zoo":
        from .registry import create

        return create(name, **({} if num_classes is None else {"num_classes": num_classes}), **kw)
    if kind in _PACKAGES:
        package = _PACKAGES[kind]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"model spec {spec!r} needs the {package!r} package: pip install {package}")
        raise ConfigError(f"{kind}: model specs are not supported yet; write a factory "
                          f"(path/to/file.py:FUNC) that returns the {kind} model")
    module = _import_file(source) if kind == "file" else _import_module(source)
    fn = getattr(module, name, None)
    if fn is None:
        raise ConfigError(f"{source} has no {name!r}")
    if not callable(fn):
        raise ConfigError(f"{source}:{name} is a {type(fn).__name__}, not a function")
    model = _call_factory(fn, f"{source}:{name}", num_classes, kw)
    model.prunekit_spec = {"spec": canonical(spec), "num_classes": num_classes, "kwargs": dict(kw)}
    return model


def load_weights(model: nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Load a plain state dict (``.pt``/``.pth``, or ``.safetensors``) into ``model``, strictly.

    A ``.pt`` file is read with ``torch.load(weights_only=True)``: one that carries pickled
    code is refused. A dict holding a ``"state_dict"`` entry (a prunekit or Lightning file)
    is accepted too.

    Raises
    ------
    CheckpointError
        Missing or unreadable file, a file with code, or weights that do not fit the model.
    ConfigError
        A ``.safetensors`` file without the ``safetensors`` package.
    """
    from ..io.checkpoint import load_state_strict, safe_torch_load

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights not found: {p}" if not p.exists() else f"weights are not a file: {p}")
    if p.suffix.lower() == ".safetensors":
        if importlib.util.find_spec("safetensors") is None:
            raise ConfigError(f"reading {p} needs the 'safetensors' package: pip install safetensors")
        from safetensors.torch import load_file  # type: ignore[import-not-found]

        try:
            state = load_file(str(p), device=str(map_location) if isinstance(map_location, str) else "cpu")
        except Exception as e:
            raise CheckpointError(f"cannot read weights {p}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:120] if str(e) else ''}") from None
    else:
        state = safe_torch_load(p, map_location, "weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{p} is not a state dict (a mapping of names to tensors)")
    load_state_strict(model, state, p)
    return model
