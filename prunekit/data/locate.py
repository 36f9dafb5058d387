"""Where a dataset's files live: the ``root`` argument, ``$PRUNEKIT_DATA``, then a default.

prunekit never downloads anything. When the files are not found, the error says every place
that was searched and how to get the data, in one line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError

ENV_VAR = "PRUNEKIT_DATA"
"""Environment variable naming a directory that holds datasets (or one dataset's files)."""


def cache_dir() -> Path:
    """``~/.cache/prunekit``, the default home of datasets that no system package provides."""
    return Path("~/.cache/prunekit").expanduser()


def candidate_dirs(root: str | os.PathLike | None, folder_names: Sequence[str],
                   default: Path | None) -> list[Path]:
    """Directories to search, in order, without duplicates.

    Parameters
    ----------
    root : path or None
        An explicit directory. When given, only ``root/<folder>`` and ``root`` are searched.
    folder_names : sequence of str
        Conventional names of the dataset's folder (``"cifar-10-batches-py"``, ...).
    default : Path or None
        Where the dataset lives when nothing else says so.

    Returns
    -------
    list of Path
        ``root/<folder>..., root`` when ``root`` is given; otherwise
        ``$PRUNEKIT_DATA/<folder>..., $PRUNEKIT_DATA`` (when set) followed by ``default``.
    """
    dirs: list[Path] = []
    if root is not None:
        bases = [Path(root).expanduser()]
    else:
        env = os.environ.get(ENV_VAR, "").strip()
        bases = [Path(env).expanduser()] if env else []
    for base in bases:
        dirs.extend(base / name for name in folder_names)
        dirs.append(base)
    if root is None and default is not None:
        dirs.append(default)
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def find_dataset_dir(title: str, root: str | os.PathLike | None, folder_names: Sequence[str],
                     default: Path | None, required: Sequence[str], how_to_get: str,
                     suffixes: Sequence[str] = ("",)) -> Path:
    """The first candidate directory that holds every required file of a dataset.

    Parameters
    ----------
    title : str
        Human name of the dataset, for the error message.
    root, folder_names, default
        See :func:`candidate_dirs`.
    required : sequence of str
        File names that must all be present.
    how_to_get : str
        The end of the error message: how to install or place the data.
    suffixes : sequence of str
        A required file ``name`` is present when ``name + suffix`` exists for any suffix
        (``("", ".gz")`` accepts plain or gzipped files).

    Raises
    ------
    DataError
        One line naming every searched directory, what a partially filled one lacks, and
        ``how_to_get``.
    """
    looked = candidate_dirs(root, folder_names, default)
    partial: list[str] = []
    for d in looked:
        if not d.is_dir():
            continue
        lacking = [n for n in required if not any((d / (n + s)).is_file() for s in suffixes)]
        if not lacking:
            return d
        if len(lacking) < len(required):
            partial.append(f"{d} lacks {', '.join(lacking)}")
    note = f" ({'; '.join(partial)})" if partial else ""
    where = ", ".join(str(d) for d in looked)
    raise DataError(f"{title} not found: looked in {where}{note}; {how_to_get}")
