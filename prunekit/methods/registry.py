"""The method registry: every method declares itself once, in its own module.

A method module calls :func:`register_method` (usually as a decorator on its ``run``) with its
name, its options dataclass (:class:`~prunekit.methods.options.MethodOptions`) and the facts the
rest of prunekit needs: which option is its own training inside a comparison's budget, whether
``round_to`` applies, whether it chooses widths itself (a budget is then optional), whether it
can resume, which optional packages it needs. :func:`get` and :func:`available` import every
module of :mod:`prunekit.methods` once, so nothing outside a method's file names it (in the
spirit of timm's ``@register_model``).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .options import MethodOptions, closest

if TYPE_CHECKING:
    from . import MethodOutput, PruneContext

Run = Callable[["PruneContext"], "MethodOutput"]
#: ``fit_budget(budget_epochs, given_options) -> options`` for a method whose own training is
#: not one option
FitBudget = Callable[[int, Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class MethodSpec:
    """What prunekit knows of one method.

    Attributes
    ----------
    name : str
        The name given to ``prunekit.prune(method=...)`` and ``--method``.
    run : callable
        ``run(ctx: PruneContext) -> MethodOutput``.
    options : type[MethodOptions]
        Its options dataclass.
    summary : str
        One line for ``prunekit methods`` and the docs.
    own_training : (str, int), optional
        The option that sets the epochs the method trains by itself, and its smallest value;
        ``None``: it trains nothing itself (or :attr:`fit_budget` decides).
    fit_budget : callable, optional
        ``fit_budget(B, given) -> options`` for a method whose own training is not one
        option (see :meth:`budget_options`).
    round_to : bool
        ``round_to`` (rounded widths) applies to it.
    chooses_widths : bool
        It decides the widths itself (thresholds, gates); a budget is then optional.
    needs_data : bool
        It reads training / calibration images.
    resumable : bool
        It accepts ``state_path`` / ``resume`` (a state file of its own training).
    requires : tuple of (import name, pip package)
        Optional packages it imports.
    vanishes : bool
        Its plan keeps the top-ranked ``widths[g]`` channels of every group, so a width of 0
        removes a residual branch whole (a latency budget's ``depth``).
    """

    name: str
    run: Run
    options: type[MethodOptions]
    summary: str = ""
    own_training: tuple[str, int] | None = None
    fit_budget: FitBudget | None = None
    round_to: bool = True
    chooses_widths: bool = False
    needs_data: bool = False
    resumable: bool = False
    vanishes: bool = False
    requires: tuple[tuple[str, str], ...] = ()

    def parse_options(self, options: Mapping[str, Any] | None, also_valid: tuple[str, ...] = ()
                      ) -> MethodOptions:
        """The method's options, checked (:meth:`MethodOptions.from_options`)."""
        return self.options.from_options(options, self.name, also_valid)

    def budget_options(self, budget: int, given: Mapping[str, Any]) -> dict[str, Any]:
        """Options that fit the method's own training into ``budget`` epochs.

        Options the caller set (``given``) are never changed; with :attr:`own_training`
        ``(name, lowest)`` the result is ``{name: max(lowest, min(default, budget))}``.
        """
        if self.fit_budget is not None:
            return self.fit_budget(budget, given)
        if self.own_training is None or self.own_training[0] in given:
            return {}
        name, lowest = self.own_training
        default = self.options.defaults()[name]
        return {name: max(lowest, min(int(default), int(budget)))}

    def check_requirements(self) -> None:
        """:class:`ConfigError` naming the package when an optional one is missing."""
        for module, package in self.requires:
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"method {self.name!r} needs the package {package!r}, which is not "
                                  f"installed: pip install {package}")


_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec``; a name registered twice is a programming error."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name].run is not spec.run:
        raise RuntimeError(f"method {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def register_method(name: str, options: type[MethodOptions], **facts: Any) -> Callable[[Run], Run]:
    """Decorator: register the decorated ``run`` as method ``name`` (see :class:`MethodSpec`)."""
    def deco(run: Run) -> Run:
        register(MethodSpec(name, run, options, **facts))
        return run
    return deco


def _load() -> None:
    """Import every module of :mod:`prunekit.methods` once (each registers its methods)."""
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module(__package__)
    for mod in pkgutil.iter_modules(package.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__package__}.{mod.name}")
    _LOADED = True


def specs() -> dict[str, MethodSpec]:
    """Every registered method, by name."""
    _load()
    return dict(_REGISTRY)


def spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``.

    Raises
    ------
    ConfigError
        An unknown name (with the closest known one), or a missing optional package.
    """
    _load()
    if not isinstance(name, str) or name not in _REGISTRY:
        near = closest(str(name), _REGISTRY)
        hint = f"did you mean {near!r}? " if near else ""
        raise ConfigError(f"unknown method {name!r}; {hint}choose from {', '.join(available())}")
    s = _REGISTRY[name]
    s.check_requirements()
    return s


def available() -> list[str]:
    """The registered method names, in registration order."""
    _load()
    return list(_REGISTRY)
