"""Folders a command will write in (--out, model.cache_dir), checked before any work starts."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable_folder_reason(path: Path) -> str | None:
    """Why `path` cannot be, or become, a folder this process writes in; None when it can."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    ancestor = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so no folder can be made inside it"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable by this user"
    return None
