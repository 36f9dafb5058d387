"""One typed options mechanism for every method.

A method declares its options as a dataclass deriving from :class:`MethodOptions`, each field
made with :func:`option` (default, help text, kind and bounds). :meth:`MethodOptions.from_options`
is the only place options are checked: an unknown or misspelt key raises
:class:`~prunekit.errors.ConfigError` naming the closest valid option, values are checked
against their kind and bounds, and the command line parses ``--name value`` / ``--opt
name=value`` into the same fields (:meth:`MethodOptions.parse_cli`), so a new option needs no
CLI edit and its ``--help`` text comes from the field.

Example
-------
>>> from dataclasses import dataclass
>>> @dataclass
... class MyOptions(MethodOptions):
...     calib_images: int = option(512, "calibration images", min=1)
>>> MyOptions.from_options({"calib_images": 64}, method="mine").calib_images
64
>>> MyOptions.from_options({"calib_image": 64}, method="mine")
Traceback (most recent call last):
...
prunekit.errors.ConfigError: unknown option 'calib_image' for method 'mine'; did you mean 'calib_images'?
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

from ..errors import ConfigError

T = TypeVar("T", bound="MethodOptions")

KINDS = ("int", "float", "bool", "str", "any")


def option(default: Any, help: str, *, kind: str | None = None, min: float | None = None,
           max: float | None = None, above: float | None = None, below: float | None = None,
           choices: Sequence[str] | None = None, words: Sequence[str] = (),
           none: bool | None = None, cli: str | None = None, aliases: Sequence[str] = ()) -> Any:
    """A method option: a dataclass field with its help text, kind and bounds.

    Parameters
    ----------
    default : object
        The default value.
    help : str
        One line for ``--help`` and the docs.
    kind : {"int", "float", "bool", "str", "any"}, optional
        The value's kind; inferred from ``default`` when not given.
    min, max : float, optional
        Inclusive bounds of a number.
    above, below : float, optional
        Exclusive bounds of a number.
    choices : sequence of str, optional
        The accepted values of a ``str`` option.
    words : sequence of str
        Words a number option also accepts (e.g. ``"auto"``).
    none : bool, optional
        ``None`` is accepted (default: when the default is ``None``).
    cli : str, optional
        The command-line flag when it is not ``--`` + the name with ``-`` for ``_``.
    aliases : sequence of str
        Other accepted keys (e.g. ``"lambda"`` for ``lam``).
    """
    if kind is None:
        kind = ("bool" if isinstance(default, bool) else "int" if isinstance(default, int)
                else "float" if isinstance(default, float) else "str" if isinstance(default, str)
                else "any")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    meta = {"help": help, "kind": kind, "min": min, "max": max, "above": above, "below": below,
            "choices": tuple(choices) if choices else None, "words": tuple(words),
            "none": default is None if none is None else none, "cli": cli,
            "aliases": tuple(aliases)}
    return field(default=default, metadata={"prunekit": meta})


@dataclass(frozen=True)
class OptionInfo:
    """What :meth:`MethodOptions.describe` says of one option."""

    name: str
    default: Any
    help: str
    kind: str
    flag: str
    constraint: str


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``name`` (``difflib``), or ``None`` when none is close."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_option(name: str, method: str, own: Iterable[str], also: Iterable[str] = ()) -> ConfigError:
    """The error for an unknown option, with the closest valid name (an option of the method
    or one of ``also``, the caller's own keywords) when there is one."""
    own = sorted(set(own))
    near = closest(name, [*own, *also])
    hint = f"; did you mean {near!r}?" if near else f"; options of {method!r}: {', '.join(own) or 'none'}"
    return ConfigError(f"unknown option {name!r} for method {method!r}{hint}")


def _meta(f: Any) -> dict[str, Any]:
    return f.metadata.get("prunekit") or {"help": "", "kind": "any", "min": None, "max": None,
                                          "above": None, "below": None, "choices": None,
                                          "words": (), "none": True, "cli": None, "aliases": ()}


def _constraint(meta: Mapping[str, Any]) -> str:
    parts = []
    if meta["kind"] in ("int", "float"):
        parts.append("an integer" if meta["kind"] == "int" else "a number")
        for key, sign in (("min", ">="), ("above", ">"), ("max", "<="), ("below", "<")):
            if meta[key] is not None:
                parts.append(f"{sign} {meta[key]:g}")
        text = " ".join(parts)
        if meta["words"]:
            text += " or " + " or ".join(repr(w) for w in meta["words"])
    elif meta["kind"] == "bool":
        text = "true or false"
    elif meta["choices"]:
        text = "one of " + ", ".join(meta["choices"])
    elif meta["kind"] == "str":
        text = "a string"
    else:
        text = "a value"
    return text + (" or None" if meta["none"] else "")


def check_value(name: str, value: Any, meta: Mapping[str, Any], method: str,
                label: str | None = None) -> Any:
    """``value`` checked against an option's kind and bounds (numbers normalised); ``label``
    names the option in the message (default ``option NAME of method 'M'``)."""
    def bad() -> ConfigError:
        return ConfigError(f"{label or f'option {name} of method {method!r}'} must be "
                           f"{_constraint(meta)}, got {value!r}")

    kind = meta["kind"]
    if value is None:
        if meta["none"]:
            return None
        raise bad()
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind in ("int", "float"):
        if isinstance(value, str) and value in meta["words"]:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad()
        if kind == "int" and not float(value).is_integer():
            raise bad()
        v = int(value) if kind == "int" else float(value)
        if ((meta["min"] is not None and v < meta["min"]) or (meta["max"] is not None and v > meta["max"])
                or (meta["above"] is not None and v <= meta["above"])
                or (meta["below"] is not None and v >= meta["below"])):
            raise bad()
        return v
    if kind == "str":
        if not isinstance(value, str) or (meta["choices"] and value not in meta["choices"]):
            raise bad()
    return value


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_text(name: str, text: str, meta: Mapping[str, Any], method: str,
               label: str | None = None) -> Any:
    """The value of an option given as text on the command line, checked (:func:`check_value`)."""
    label = label or f"option {name} of method {method!r}"
    kind = meta["kind"]
    if meta["none"] and text.lower() == "none":
        return None
    if kind == "bool":
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
    elif kind in ("int", "float"):
        if text in meta["words"]:
            return text
        try:
            value = float(text) if kind == "float" or not text.lstrip("+-").isdigit() else int(text)
        except ValueError:
            pass
        else:
            return check_value(name, value, meta, method, label)
    elif kind == "str":
        return check_value(name, text, meta, method, label)
    else:
        return text  # checked by the options' validate()
    raise ConfigError(f"{label} must be {_constraint(meta)}, got {text!r}")


@dataclass
class MethodOptions:
    """Base of every method's options dataclass (see the module docstring).

    Subclasses may override :meth:`validate` for checks that involve several options. Every
    value is checked on construction too, so ``MyOptions(x=-1)`` fails like
    ``MyOptions.from_options({"x": -1}, ...)``.
    """

    def __post_init__(self) -> None:
        for f in fields(self):
            meta = _meta(f)
            value = getattr(self, f.name)
            if value is None and not meta["none"] and f.default is not None:
                raise ConfigError(f"option {f.name} ({type(self).__name__}) must be "
                                  f"{_constraint(meta)}, got None")
            setattr(self, f.name, check_value(f.name, value, meta, "",
                                              f"option {f.name} ({type(self).__name__})"))
        self.validate()

    @classmethod
    def names(cls) -> list[str]:
        """The option names."""
        return [f.name for f in fields(cls)]

    @classmethod
    def _keys(cls) -> dict[str, str]:
        keys = {}
        for f in fields(cls):
            keys[f.name] = f.name
            for alias in _meta(f)["aliases"]:
                keys[alias] = f.name
        return keys

    @classmethod
    def from_options(cls: type[T], options: Mapping[str, Any] | None, method: str,
                     also_valid: Iterable[str] = ()) -> T:
        """Options of ``method`` from a mapping, every key and value checked.

        Parameters
        ----------
        options : mapping
            Option name (or alias) -> value; ``None`` values of options that do not accept
            ``None`` mean "the default".
        method : str
            The method's name, for messages.
        also_valid : iterable of str
            Other names the caller accepts (e.g. :func:`prunekit.prune`'s keywords), offered as
            suggestions for a misspelt key.

        Raises
        ------
        ConfigError
            An unknown key (with the closest valid name) or a value of the wrong kind or out
            of bounds.
        """
        keys = cls._keys()
        kw: dict[str, Any] = {}
        metas = {f.name: _meta(f) for f in fields(cls)}
        for key, value in (options or {}).items():
            if key not in keys:
                raise unknown_option(key, method, keys, also_valid)
            name = keys[key]
            if value is None and not metas[name]["none"]:
                continue
            kw[name] = check_value(name, value, metas[name], method)
        return cls(**kw)

    def validate(self) -> None:
        """Checks across options (none by default)."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Option name -> default value."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    def as_dict(self) -> dict[str, Any]:
        """The options as a plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def describe(cls) -> list[OptionInfo]:
        """Every option's name, default, help, kind, command-line flag and constraint."""
        out = []
        for f in fields(cls):
            meta = _meta(f)
            default = f.default if f.default is not MISSING else None
            out.append(OptionInfo(f.name, default, meta["help"], meta["kind"],
                                  meta["cli"] or "--" + f.name.replace("_", "-"), _constraint(meta)))
        return out

    @classmethod
    def parse_cli(cls, args: Sequence[str], method: str, also_valid: Iterable[str] = ()) -> dict[str, Any]:
        """Options from command-line words: ``--name value``, ``--name=value``, a bare
        ``--flag`` / ``--no-flag`` for a true/false option, or ``--opt name=value``.

        Raises
        ------
        ConfigError
            An unknown flag (with the closest valid one), a missing or malformed value.
        """
        metas = {f.name: _meta(f) for f in fields(cls)}
        flags: dict[str, str] = {}
        for f in fields(cls):
            flags[metas[f.name]["cli"] or "--" + f.name.replace("_", "-")] = f.name
            for alias in metas[f.name]["aliases"]:
                flags["--" + alias.replace("_", "-")] = f.name
        out: dict[str, Any] = {}
        i = 0
        while i < len(args):
            word = args[i]
            if not word.startswith("--"):
                raise ConfigError(f"unexpected argument {word!r}")
            flag, eq, text = word.partition("=")
            if flag == "--opt":
                pair = text if eq else (args[i + 1] if i + 1 < len(args) else "")
                i += 1 if eq else 2
                key, eq2, val = pair.partition("=")
                if not eq2 or not key:
                    raise ConfigError(f"--opt takes name=value, got {pair!r}")
                name = cls._keys().get(key.replace("-", "_"))
                if name is None:
                    raise unknown_option(key, method, cls._keys(), also_valid)
                out[name] = parse_text(name, val, metas[name], method,
                                       f"--opt {key} (option {name} of method {method!r})")
                continue
            negated = flag.startswith("--no-") and flag not in flags and "--" + flag[5:] in flags
            name = flags.get("--" + flag[5:] if negated else flag)
            if name is None:
                near = closest(flag, [*flags, *("--" + n.replace("_", "-") for n in also_valid)])
                hint = f"; did you mean {near}?" if near else ""
                raise ConfigError(f"no such option {flag} for method {method!r}{hint}")
            meta = metas[name]
            if meta["kind"] == "bool" and not eq and (negated or i + 1 >= len(args)
                                                      or args[i + 1].startswith("--")
                                                      or args[i + 1].lower() not in _TRUE + _FALSE):
                out[name] = not negated
                i += 1
                continue
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"option {flag} needs a value")
                text = args[i + 1]
                i += 2
            else:
                i += 1
            out[name] = parse_text(name, text, meta, method,
                                   f"{flag} (option {name} of method {method!r})")
        return out

