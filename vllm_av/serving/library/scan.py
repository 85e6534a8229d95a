"""Scan a library directory (one entry per sub-directory) into validated entries, sorted by name."""

from __future__ import annotations

import logging
from pathlib import Path

from vllm_av.format.validate import AVFileError
from vllm_av.serving.settings.config import AVConfig

logger = logging.getLogger("vllm.av")


class AVLibraryError(ValueError):
    """The AV library (or one AV in it) cannot be served."""


def scan_entries(root: Path, config: AVConfig, load_one, noun: str, plural: str, allow_empty: bool = False) -> list:
    """``load_one(directory)`` for every entry of the library ``root`` (None: not an entry), sorted by name.

    Names must be unique; with ``config.lenient`` an entry that raises :class:`AVLibraryError` (or
    the format's :class:`~vllm_av.format.validate.AVFileError`) is refused with a warning and the rest are kept; an empty result is an error unless ``allow_empty``. ``noun``/``plural``
    name what the library holds in messages ("AV"/"adapters")."""
    label = noun.replace(" ", "-")
    entries: dict = {}
    refused = 0
    for directory in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        try:
            entry = load_one(directory)
            if entry is not None and entry.name in entries:
                raise AVLibraryError(f"{directory}: {label} name {entry.name!r} is also used by {entries[entry.name].path}")
        except (AVLibraryError, AVFileError) as exc:
            if not config.lenient:
                raise AVLibraryError(str(exc)) from None
            logger.warning("vllm-av: %s refused (lenient loading): %s", noun, exc)
            refused += 1
            continue
        if entry is not None:
            entries[entry.name] = entry
    if not entries and not allow_empty:
        reason = f" ({refused} refused)" if refused else ""
        raise AVLibraryError(f"{root}: the {label} library holds no {plural}{reason}")
    return [entries[name] for name in sorted(entries)]
