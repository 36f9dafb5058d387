"""A restricted unpickler for dataset files that are pickles (the CIFAR python batches).

A pickle can name any importable callable and have it called while loading, so a downloaded
"dataset" file could run code. :class:`RestrictedUnpickler` resolves only the handful of
globals that plain NumPy-array-in-a-dict pickles need and refuses everything else with a
:class:`~prunekit.errors.DataError` *before* anything is called.
"""

from __future__ import annotations

import codecs
import importlib
import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

# NumPy moved ``numpy.core`` to ``numpy._core`` in 2.0; pickles written by either version
# name one of the two. Both spellings resolve to whichever module this NumPy has.
_NUMPY_CORE_FUNCS: dict[tuple[str, str], tuple[str, str]] = {
    (f"numpy.{core}.{sub}", name): (sub, name)
    for core in ("core", "_core")
    for sub, name in (("multiarray", "_reconstruct"),   # ndarray.__reduce__ (protocol <= 4)
                      ("multiarray", "scalar"),         # NumPy scalars (np.int64(3), ...)
                      ("numeric", "_frombuffer"))       # ndarray.__reduce_ex__ (protocol 5)
}

# Builtins that only build containers from already-unpickled items. ``__builtin__`` is the
# Python 2 name (and what Python 3 writes at protocol 2). ``bytearray`` is left out on purpose:
# ``bytearray(10**12)`` would be a one-opcode memory bomb, and protocol 5 has its own opcode.
_BUILTINS = {"set": set, "frozenset": frozenset}

ALLOWED_GLOBALS: frozenset[str] = frozenset(
    [f"{m}.{n}" for m, n in _NUMPY_CORE_FUNCS]
    + ["numpy.ndarray", "numpy.dtype", "_codecs.encode"]
    + [f"{m}.{n}" for m in ("builtins", "__builtin__") for n in _BUILTINS]
)
"""Every ``module.name`` a dataset pickle may refer to."""


def _numpy_core(sub: str) -> Any:
    """``numpy._core.<sub>`` on NumPy 2, ``numpy.core.<sub>`` on NumPy 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module(f"numpy._core.{sub}")
        except ImportError:  # NumPy < 1.26 has no numpy._core
            return importlib.import_module(f"numpy.core.{sub}")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only NumPy arrays, dtypes, scalars and plain containers.

    Parameters
    ----------
    file : binary file object
        The pickle stream.
    source : str
        Name of the file, used in error messages.
    encoding : str
        How Python 2 ``str`` objects are decoded; ``"bytes"`` (the default) keeps them as
        ``bytes``, which is what the CIFAR batches need (their keys are ``b"data"``, ...).

    Raises
    ------
    DataError
        From :meth:`find_class`, for any global not in :data:`ALLOWED_GLOBALS`.
    """

    def __init__(self, file: io.BufferedIOBase, *, source: str, encoding: str = "bytes") -> None:
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _NUMPY_CORE_FUNCS:
            sub, attr = _NUMPY_CORE_FUNCS[key]
            return getattr(_numpy_core(sub), attr)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return _BUILTINS[name]
        if key == ("_codecs", "encode"):  # how protocol 2 stores ``bytes`` objects
            return codecs.encode
        raise DataError(f"refusing to unpickle {module}.{name} from {self.source}: dataset "
                        "pickles may only contain NumPy arrays and plain containers")


def load_pickle(path: str | Path) -> Any:
    """Load a dataset pickle with :class:`RestrictedUnpickler`.

    Parameters
    ----------
    path : str or Path
        The pickle file.

    Returns
    -------
    object
        The unpickled object (for CIFAR, a ``dict`` with ``bytes`` keys).

    Raises
    ------
    DataError
        If the file cannot be read, is truncated or corrupt, or names a forbidden global.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, source=str(path)).load()
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... from a bad stream
        raise DataError(f"cannot unpickle {path}: corrupt or truncated pickle "
                        f"({type(e).__name__}: {e})") from e
