"""Model specs: build a model from a short string, and load plain weights into it.

A spec names where a model comes from:

* ``zoo:NAME`` (or a bare ``NAME``): a prunekit zoo model, :func:`prunekit.models.create`;
* ``path/to/file.py:FUNC``: a factory function (or class) in a Python file;
* ``package.module:FUNC``: a factory in an importable module;
* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None)``;
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)``;
* ``hf:MODEL_TYPE``: a Hugging Face ``transformers`` image classifier built from its config
  class alone (``AutoConfig.for_model(MODEL_TYPE)`` then
  ``AutoModelForImageClassification.from_config``), e.g. ``hf:resnet``, ``hf:convnext``,
  ``hf:mobilenet_v2``, ``hf:regnet``.

No spec downloads anything: the library models start from random weights (give yours with
``--weights`` / :func:`load_weights`). The factory is called with no arguments, plus
``num_classes`` when one is given and the factory accepts it; it must return an ``nn.Module``.
The file or module is imported only because it was named: building from a spec runs that code.
The library builders are prunekit's own, so a checkpoint that records ``torchvision:``,
``timm:`` or ``hf:`` rebuilds without running code the file names.

Models whose forward returns something other than a tensor (a Hugging Face ``ModelOutput``,
torchvision GoogLeNet's named tuple in training mode) are wrapped in :class:`OutputAdapter`,
whose forward returns the logits tensor, so pruning, evaluation, profiling and ONNX export see
a plain ``nn.Module -> Tensor``. Its parameters live under ``model.``; :func:`load_weights`
reads the unwrapped model's own state dict into it.

>>> from prunekit.models.spec import build
>>> model = build("zoo:resnet20", num_classes=10)
"""

from __future__ import annotations

import contextlib
import difflib
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

__all__ = ["OutputAdapter", "build", "canonical", "load_weights", "logits_of"]

_PACKAGES = {"torchvision": "torchvision", "timm": "timm", "hf": "transformers"}

# torchvision classifiers whose training-mode forward returns a named tuple (auxiliary heads)
_TUPLE_OUTPUT = ("googlenet", "inception_v3")


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor in a model's output.

    A tensor is returned as is; from a mapping or dataclass (Hugging Face ``ModelOutput``) the
    ``logits`` entry, else its first tensor; from a (named) tuple its first element.

    Raises
    ------
    ModelError
        No tensor can be found in ``output``.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, dict):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        values = []
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise ModelError(f"the model returned a {type(output).__name__} holding no tensor; prunekit "
                     "needs a forward that returns the logits (or a dict / ModelOutput with 'logits')")


class OutputAdapter(nn.Module):
    """Wrap a model whose forward returns a dict, dataclass or tuple, so that it returns the
    logits tensor (:func:`logits_of`).

    The wrapper is itself a plain ``nn.Module`` (pruned in place like any other, saved with
    its parameters under ``model.``); ``OutputAdapter(net).model is net``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return logits_of(self.model(x))


def _missing_package(spec: str, package: str) -> ConfigError:
    return ConfigError(f"model spec {spec!r} needs the {package!r} package: pip install {package} "
                       "(`make test-vision` sets up .venv-vision with torchvision, timm and "
                       "transformers)")


def _unknown(kind: str, name: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {kind}:{close[0]}?" if close else f" (see {where})"
    return ConfigError(f"unknown {kind} model {name!r}{hint}")


def _library_call(spec: str, fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
    try:
        model = fn(*args, **kwargs)
    except Exception as e:
        text = " ".join(str(e).split())[:300]
        raise ModelError(f"building {spec} raised {type(e).__name__}: {text}") from None
    if not isinstance(model, nn.Module):  # pragma: no cover - the libraries return modules
        raise ModelError(f"building {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _build_torchvision(spec: str, name: str, num_classes: int | None, kw: dict[str, Any]) -> nn.Module:
    import torchvision

    known = list(torchvision.models.list_models())
    if name not in known:
        raise _unknown("torchvision", name, known, "torchvision.models.list_models()")
    kwargs = dict(kw)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    builder = torchvision.models.get_model_builder(name)
    with contextlib.suppress(TypeError, ValueError):
        if "weights_backbone" in inspect.signature(builder).parameters:  # detection/segmentation
            kwargs.setdefault("weights_backbone", None)  # no ImageNet backbone download either
    return _library_call(spec, builder, weights=None, **kwargs)


def _build_timm(spec: str, name: str, num_classes: int | None, kw: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name.split(".")[0]):  # NAME.TAG (pretrained tags) names NAME
        raise _unknown("timm", name, list(timm.list_models()), "timm.list_models()")
    kwargs = dict(kw)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return _library_call(spec, timm.create_model, name, pretrained=False, **kwargs)


def _build_hf(spec: str, model_type: str, num_classes: int | None, kw: dict[str, Any]) -> nn.Module:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    known = sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    if model_type not in known:
        raise _unknown("hf", model_type, known, "transformers' image-classification model types")
    kwargs = dict(kw)
    if num_classes is not None:
        kwargs["num_labels"] = num_classes
    try:
        config = transformers.AutoConfig.for_model(model_type, **kwargs)
    except Exception as e:
        raise ModelError(f"building {spec}: its config refused {kwargs}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}") from None
    return _library_call(spec, transformers.AutoModelForImageClassification.from_config, config)


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


def is_zoo(spec: str) -> bool:
    """Whether ``spec`` names a prunekit zoo model (``zoo:NAME`` or a bare ``NAME``)."""
    return _split(spec)[0] == "zoo"


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


def build(spec: str, num_classes: int | None = None, *, output_adapter: bool | None = None,
          **kw: Any) -> nn.Module:
    """Build the model a spec names.

    Parameters
    ----------
    spec : str
        ``zoo:NAME`` (or ``NAME``), ``torchvision:NAME``, ``timm:NAME``, ``hf:MODEL_TYPE``,
        ``path/to/file.py:FUNC`` or ``package.module:FUNC``.
    num_classes : int, optional
        Passed to a zoo, torchvision or timm model (``num_classes``), to a Hugging Face config
        (``num_labels``), and to a factory that accepts ``num_classes`` (or ``**kwargs``);
        ``None`` keeps the model's own default.
    output_adapter : bool, optional
        Wrap the model in :class:`OutputAdapter` (its forward then returns the logits tensor).
        ``None`` (default): for ``hf:`` models and torchvision's GoogLeNet / Inception-v3, whose
        outputs are a ``ModelOutput`` / a named tuple.
    **kw
        Further keyword arguments for the zoo model, the library's builder (the Hugging Face
        config) or the factory.

    Returns
    -------
    nn.Module
        The fresh model, with ``model.prunekit_spec = {"spec", "num_classes", "kwargs",
        "output_adapter"}`` (the spec with a factory file made absolute) unless it is a zoo model
        (which records ``model.prunekit_arch``); :func:`prunekit.save` writes it into the
        checkpoint so that :func:`prunekit.load` rebuilds the model from the file alone.

    Raises
    ------
    ConfigError
        A bad spec, a missing file or module, a missing function, an unknown library model
        (with the closest name), a package to install.
    ModelError
        Importing the code failed, the factory or the library raised, or no ``nn.Module``.

    Examples
    --------
    >>> build("torchvision:resnet18", num_classes=10)  # doctest: +SKIP
    >>> build("hf:convnext", num_classes=10)  # an OutputAdapter around ConvNextForImageClassification
    ... # doctest: +SKIP
    """
    kind, source, name = _split(spec)
    if kind == "zoo":
        from .registry import create

        return create(name, **({} if num_classes is None else {"num_classes": num_classes}), **kw)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if kind in _PACKAGES:
        package = _PACKAGES[kind]
        if not name.strip():
            raise ConfigError(f"bad model spec {spec!r}: expected {kind}:NAME")
        if importlib.util.find_spec(package) is None:
            raise _missing_package(spec, package)
        builder = {"torchvision": _build_torchvision, "timm": _build_timm, "hf": _build_hf}[kind]
        model = builder(spec.strip(), name.strip(), num_classes, kw)
        if output_adapter is None:
            output_adapter = kind == "hf" or (kind == "torchvision" and name.strip() in _TUPLE_OUTPUT)
    else:
        module = _import_file(source) if kind == "file" else _import_module(source)
        fn = getattr(module, name, None)
        if fn is None:
            raise ConfigError(f"{source} has no {name!r}")
        if not callable(fn):
            raise ConfigError(f"{source}:{name} is a {type(fn).__name__}, not a function")
        model = _call_factory(fn, f"{source}:{name}", num_classes, kw)
    if output_adapter:
        model = OutputAdapter(model)
    model.prunekit_spec = {"spec": canonical(spec), "num_classes": num_classes, "kwargs": dict(kw),
                           "output_adapter": bool(output_adapter)}
    return model


def load_weights(model: nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Load a plain state dict (``.pt``/``.pth``, or ``.safetensors``) into ``model``, strictly.

    A ``.pt`` file is read with ``torch.load(weights_only=True)``: one that carries pickled
    code is refused. A dict holding a ``"state_dict"`` entry (a prunekit or Lightning file)
    is accepted too. Into an :class:`OutputAdapter` the weights of the wrapped model are read
    (the state dict the library's own model writes), or the adapter's own (``model.`` keys).

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
    target = model
    if isinstance(model, OutputAdapter) and not all(k.startswith("model.") for k in state):
        target = model.model
    load_state_strict(target, state, p)
    return model
