"""Checkpoints of (pruned) models that rebuild their own, narrower architecture.

A prunekit checkpoint is a ``torch.save`` file holding only tensors and JSON-like values::

    {"format": "prunekit", "version": 1,
     "arch": {"name", "num_classes", "in_channels", "kwargs"} or None,
     "shapes": {module_name: {"type": "Conv2d", "in_channels", "out_channels", "groups"}, ...},
     "state_dict": {...}, "meta": {...} or None, "plan": str, dict or None}

It is always read with ``torch.load(weights_only=True)``, so the file itself cannot run code
when it is loaded. ``shapes`` records the width of every conv, linear and normalisation layer:
loading builds the architecture (from the zoo, the instance the caller passes, or the model
spec recorded in ``meta["model_spec"]``), narrows the layers whose recorded width differs,
then loads the weights strictly. A recorded spec names the user's factory
(``/abs/path/net.py:make_net``): :func:`load` imports and calls it, so load such a file only
when you trust the code it names (pass ``model=`` to build the model yourself instead). A spec
naming a library model (``torchvision:NAME``, ``timm:NAME``, ``hf:TYPE``) is rebuilt by
prunekit's own builders (:func:`prunekit.models.build`, no weights downloaded), so such a file
loads from the path alone with no code of its own run.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..utils import atomic_path

__all__ = ["FORMAT", "VERSION", "save", "load", "read", "layer_shapes", "resize_layers", "fit_free_tensors"]

FORMAT = "prunekit"
VERSION = 1

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ---------------------------------------------------------------------------------------------
# layer geometry
# ---------------------------------------------------------------------------------------------

def _geometry(module: nn.Module) -> dict[str, Any] | None:
    """The width-defining attributes of a layer prunekit can narrow, else ``None``."""
    kind = type(module).__name__
    from ..engine.depth import BranchConstant, Vanished

    if isinstance(module, Vanished):  # a layer of a residual branch removed whole
        return {"type": kind, "passes": module.passes}
    if isinstance(module, BranchConstant):
        return {"type": kind, "out_channels": module.out_channels}
    if isinstance(module, _CONV):
        return {"type": kind, "in_channels": module.in_channels, "out_channels": module.out_channels,
                "groups": module.groups, "bias": module.bias is not None}
    if isinstance(module, nn.Linear):
        return {"type": kind, "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    if isinstance(module, _BN):
        return {"type": kind, "num_features": module.num_features}
    if isinstance(module, nn.GroupNorm):
        return {"type": kind, "num_groups": module.num_groups, "num_channels": module.num_channels}
    if isinstance(module, nn.PReLU):
        return {"type": kind, "num_parameters": module.num_parameters}
    if isinstance(module, nn.LayerNorm):  # subclasses too: timm's LayerNorm2d, HF's ConvNextLayerNorm
        return {"type": kind, "normalized_shape": [int(v) for v in module.normalized_shape]}
    return None


def layer_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Geometry of every ``Conv1d/2d/3d``, ``Linear``, ``BatchNorm1d/2d/3d``, ``GroupNorm``,
    ``PReLU`` and ``LayerNorm`` in ``model``, keyed by module name (transposed convolutions are
    not recorded)."""
    shapes = {}
    for name, module in model.named_modules():
        geom = _geometry(module)
        if geom is not None:
            shapes[name] = geom
    return shapes


def _new_param(old: torch.Tensor | None, shape: tuple[int, ...]) -> nn.Parameter | None:
    if old is None:
        return None
    return nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                        requires_grad=old.requires_grad)


def _new_bias(module: nn.Module, geom: dict[str, Any], n: int) -> nn.Parameter | None:
    """A bias of ``n`` entries when the recorded layer has one (reconstruction can add a bias
    to a layer built without one), none when it has none; old files without the flag keep the
    module's own choice."""
    has_bias = geom.get("bias", module.bias is not None)
    if not has_bias:
        return None
    return _new_param(module.bias if module.bias is not None else module.weight, (n,))


def _resize(module: nn.Module, geom: dict[str, Any]) -> None:
    """Narrow (or widen) ``module`` in place to ``geom``; values are left uninitialised.

    Kernel size, stride, padding, dilation, bias, eps, momentum, affine and running-statistics
    settings are kept, and so is the module's class (subclasses of torch layers included).
    """
    if isinstance(module, _CONV):
        cin, cout, groups = int(geom["in_channels"]), int(geom["out_channels"]), int(geom["groups"])
        if groups < 1 or cin % groups or cout % groups:
            raise ValueError(f"channels {cin}->{cout} are not divisible by groups={groups}")
        module.in_channels, module.out_channels, module.groups = cin, cout, groups
        module.weight = _new_param(module.weight, (cout, cin // groups, *module.kernel_size))
        module.bias = _new_bias(module, geom, cout)
    elif isinstance(module, nn.Linear):
        fin, fout = int(geom["in_features"]), int(geom["out_features"])
        module.in_features, module.out_features = fin, fout
        module.weight = _new_param(module.weight, (fout, fin))
        module.bias = _new_bias(module, geom, fout)
    elif isinstance(module, _BN):
        n = int(geom["num_features"])
        module.num_features = n
        module.weight = _new_param(module.weight, (n,))
        module.bias = _new_param(module.bias, (n,))
        for buf in ("running_mean", "running_var"):
            old = getattr(module, buf, None)
            if old is not None:
                setattr(module, buf, torch.empty(n, dtype=old.dtype, device=old.device))
    elif isinstance(module, nn.GroupNorm):
        groups, n = int(geom["num_groups"]), int(geom["num_channels"])
        if groups < 1 or n % groups:
            raise ValueError(f"{n} channels are not divisible into {groups} groups")
        module.num_groups, module.num_channels = groups, n
        module.weight = _new_param(module.weight, (n,))
        module.bias = _new_param(module.bias, (n,))
    elif isinstance(module, nn.PReLU):
        n = int(geom["num_parameters"])
        module.num_parameters = n
        module.weight = _new_param(module.weight, (n,))
    elif isinstance(module, nn.LayerNorm):
        shape = tuple(int(v) for v in geom["normalized_shape"])
        if not shape or any(v < 1 for v in shape):
            raise ValueError(f"bad normalized_shape {list(shape)}")
        module.normalized_shape = shape
        module.weight = _new_param(module.weight, shape)
        module.bias = _new_param(module.bias, shape)
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(f"cannot resize a {type(module).__name__}")


def fit_free_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Give the parameters and buffers that no recorded layer owns the shape they have in
    ``state``, in place (uninitialised, ready for ``load_state_dict``).

    Pruning narrows tensors that belong to no standard layer as well: ConvNeXt's per-channel
    ``layer_scale`` / ``gamma``, a class token or position embedding. Only tensors of modules
    that are not a recorded layer type (:func:`layer_shapes`) and that have the same number of
    dimensions in both are resized; anything else is left for the strict load to refuse.

    Returns
    -------
    list of str
        Names of the tensors that were resized.
    """
    resized = []
    modules = dict(model.named_modules())
    for key, value in state.items():
        owner, _, attr = key.rpartition(".")
        module = modules.get(owner)
        if module is None or _geometry(module) is not None or not isinstance(value, torch.Tensor):
            continue
        current = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
        if current is None or current.shape == value.shape or current.dim() != value.dim():
            continue
        fresh = torch.empty(value.shape, dtype=current.dtype, device=current.device)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(fresh, requires_grad=current.requires_grad)
        else:
            module._buffers[attr] = fresh
        resized.append(key)
    return resized


def _vanish_layer(model: nn.Module, name: str, module: nn.Module, geom: dict[str, Any]) -> None:
    """Replace ``module`` by the :class:`~prunekit.engine.depth.Vanished` or
    :class:`~prunekit.engine.depth.BranchConstant` the checkpoint records at ``name``."""
    from ..engine.depth import BranchConstant, Vanished

    try:
        if geom["type"] == "Vanished":
            new: nn.Module = Vanished(module)
        else:
            new = BranchConstant(module)
            new.bias = _new_param(new.bias, (int(geom["out_channels"]),))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"layer {name!r}: cannot stand for a {type(module).__name__} "
                              f"removed whole: {e}") from None
    model.set_submodule(name, new)


def resize_layers(model: nn.Module, shapes: dict[str, dict[str, Any]]) -> list[str]:
    """Give every layer named in ``shapes`` its recorded geometry, in place.

    Layers whose geometry already matches are left alone; the others get fresh (uninitialised)
    parameters of the recorded size, ready for ``load_state_dict``.

    Returns
    -------
    list of str
        Names of the layers that were resized.

    Raises
    ------
    CheckpointError
        A recorded layer is missing from ``model``, has another type, or a bad geometry.
    """
    resized = []
    modules = dict(model.named_modules())
    for name, geom in shapes.items():
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"layer {name or '<root>'!r} of the checkpoint is not in the model")
        current = _geometry(module)
        if geom.get("type") in ("Vanished", "BranchConstant") and current is not None \
                and current["type"] != geom["type"]:
            _vanish_layer(model, name, module, geom)
            resized.append(name)
            continue
        if current is None or current["type"] != geom.get("type"):
            raise CheckpointError(f"layer {name or '<root>'!r} is a {type(module).__name__} in the "
                                  f"model but a {geom.get('type')} in the checkpoint")
        if current == geom:
            continue
        try:
            _resize(module, geom)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"layer {name or '<root>'!r}: bad recorded geometry {geom}: {e}") from None
        resized.append(name)
    return resized


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------

def _json_value(value: Any, what: str) -> Any:
    """Check that ``value`` is JSON-serialisable (so it loads under weights_only)."""
    if value is None:
        return None
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} must be JSON-serialisable: {e}") from None
    return value


def save(model: nn.Module, path: str | os.PathLike, meta: dict | None = None,
         plan: str | dict | None = None) -> None:
    """Write ``model`` to ``path`` as a prunekit checkpoint, atomically.

    Parameters
    ----------
    model : nn.Module
        A zoo model (pruned or not) or any module; ``model.prunekit_arch``, when present, lets
        :func:`load` rebuild it without an instance.
    path : path
        Output file; its directory must exist. Written under a temporary name and renamed, so
        a failure never leaves a partial file and an existing file survives it.
    meta : dict, optional
        JSON-serialisable facts about the model (dataset, accuracy, input shape, ...).
    plan : str or dict, optional
        The pruning plan that produced the model (JSON-serialisable).

    Raises
    ------
    ConfigError
        ``meta``/``plan``/``arch`` not JSON-serialisable, or the output directory is missing.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"save() needs an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module  # save the network, not its wrapper
    if meta is not None and not isinstance(meta, dict):
        raise ConfigError(f"meta must be a dict, got {type(meta).__name__}")
    if plan is not None and not isinstance(plan, (str, dict)):
        raise ConfigError(f"plan must be a str or dict, got {type(plan).__name__}")
    arch = getattr(model, "prunekit_arch", None)
    if arch is not None and not isinstance(arch, dict):
        raise ConfigError(f"model.prunekit_arch must be a dict, got {type(arch).__name__}")
    model_spec = getattr(model, "prunekit_spec", None)
    if arch is None and isinstance(model_spec, dict) and "model_spec" not in (meta or {}):
        meta = {**(meta or {}), "model_spec": model_spec}  # lets load() rebuild a factory model
    state = model.state_dict()
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": _json_value(arch, "model.prunekit_arch"),
        "shapes": layer_shapes(model),
        "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
        # the modules' versions (``state_dict()._metadata``): some architectures read them when
        # loading (torchvision's MNASNet refuses a state dict without them)
        "state_metadata": {k: {str(a): b for a, b in dict(v).items() if isinstance(b, (int, float, str))}
                           for k, v in getattr(state, "_metadata", {}).items()},
        "meta": _json_value(meta, "meta"),
        "plan": _json_value(plan, "plan"),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def safe_torch_load(path: Path, map_location: Any = "cpu", what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never pickled
    code; every failure is one :class:`CheckpointError` line naming ``what`` and the cause."""
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the refusal below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types: UnpicklingError, RuntimeError, EOFError...
        text = str(e).strip()
        if "weights only load failed" in text.lower() or "unsupported global" in text.lower():
            detail = "it contains pickled objects other than tensors (refused for safety)"
        else:
            first = text.splitlines()[0].split(". ")[0][:120] if text else ""
            detail = f"corrupt, truncated or not a PyTorch file ({type(e).__name__}: {first})"
        raise CheckpointError(f"cannot read {what} {path}: {detail}") from None


def load_state_strict(model: nn.Module, state: Any, path: Path) -> None:
    """``model.load_state_dict(state, strict=True)``; weights that do not fit (or a module that
    refuses them) are one :class:`CheckpointError` line naming ``path``."""
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = " ".join(lines[1:3]) if len(lines) > 1 else (lines[0] if lines else "")
        raise CheckpointError(f"{path}: weights do not fit the model: {detail[:300]}") from None


def read(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The validated raw content of a prunekit checkpoint (no model is built).

    Raises
    ------
    CheckpointError
        The file is missing, unreadable, truncated, not a prunekit checkpoint, or carries
        pickled code (refused by ``weights_only=True``).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint is not a file: {p}")
    payload = safe_torch_load(p, map_location, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a prunekit checkpoint (write one with prunekit.save or "
                              "`prunekit train`)")
    version = payload.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{p}: unsupported checkpoint version {version!r} (this prunekit "
                              f"reads version {VERSION})")
    if not isinstance(payload.get("state_dict"), dict) or not isinstance(payload.get("shapes", {}), dict):
        raise CheckpointError(f"{p}: corrupt prunekit checkpoint (no state_dict)")
    return payload


def load(path: str | os.PathLike, model: nn.Module | None = None,
         map_location: Any = "cpu", *, trust_code: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild a model from a prunekit checkpoint, pruned widths included.

    Parameters
    ----------
    path : path
        A file written by :func:`save`.
    model : nn.Module, optional
        An instance of the original (unpruned) architecture, modified in place (on failure it
        may be left partly resized). Needed when the checkpoint has neither a zoo architecture
        (``arch``) nor a model spec (``meta["model_spec"]``, written for a model built by
        :func:`prunekit.models.build` or ``prunekit prune --model``); otherwise the zoo, or the
        factory the spec names (its code is imported and run: only with ``trust_code``).
    map_location : str or torch.device
        Where tensors are loaded (and where a zoo-built model is placed).
    trust_code : bool
        Allow a checkpoint whose model spec names a factory (``file.py:FUNC``,
        ``package.module:FUNC``) to import and run it. Off by default: reading a file never runs
        code the file names unless you say so.

    Returns
    -------
    model : nn.Module
        In eval mode, with the checkpoint's layer widths and weights.
    meta : dict
        The checkpoint's ``meta`` (empty when none was saved).

    Raises
    ------
    CheckpointError
        Unreadable/corrupt/unsafe file, unknown architecture, or weights that do not fit.
    """
    payload = read(path, map_location=map_location)
    p = Path(path)
    arch = payload.get("arch")
    meta = payload.get("meta") if isinstance(payload.get("meta"), dict) else {}
    model_spec = meta.get("model_spec")
    if model is None:
        from ..errors import PrunekitError

        if isinstance(arch, dict) and "name" in arch:
            from ..models import create

            try:
                model = create(arch["name"], num_classes=arch.get("num_classes", 10),
                               in_channels=arch.get("in_channels", 3), **(arch.get("kwargs") or {}))
            except (PrunekitError, TypeError, ValueError) as e:
                raise CheckpointError(f"{p}: cannot build architecture {arch.get('name')!r}: {e}") from None
        elif isinstance(model_spec, dict) and isinstance(model_spec.get("spec"), str):
            from ..models.spec import build, names_code

            if names_code(model_spec["spec"]) and not trust_code:
                raise CheckpointError(
                    f"{p} rebuilds its model by running code it names ({model_spec['spec']}); load "
                    "it only if you trust that code: prunekit.load(path, trust_code=True) or "
                    "--trust-code, or pass the unpruned model: load(path, model=...)")

            try:
                model = build(model_spec["spec"], num_classes=model_spec.get("num_classes"),
                              output_adapter=model_spec.get("output_adapter"),
                              **(model_spec.get("kwargs") or {}))
            except PrunekitError as e:
                raise CheckpointError(f"{p}: cannot build its model {model_spec['spec']!r}: {e}") from None
        else:
            raise CheckpointError(f"{p} records no zoo architecture or model spec; pass the "
                                  "unpruned model instance: load(path, model=...)")
        if isinstance(map_location, (str, torch.device)):
            model = model.to(map_location)
    elif not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        resize_layers(model, payload.get("shapes") or {})
    except CheckpointError as e:
        raise CheckpointError(f"{p} does not fit the model: {e}") from None
    state = OrderedDict(payload["state_dict"])
    fit_free_tensors(model, state)
    if isinstance(payload.get("state_metadata"), dict):
        state._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k, dict(v)) for k, v in payload["state_metadata"].items() if isinstance(v, dict))
    load_state_strict(model, state, p)
    if arch is not None and getattr(model, "prunekit_arch", None) is None:
        model.prunekit_arch = arch
    if isinstance(model_spec, dict) and getattr(model, "prunekit_spec", None) is None:
        model.prunekit_spec = model_spec
    model.eval()
    return model, dict(meta)
