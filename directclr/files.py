"""Writes that a kill, or another node writing the same file, cannot leave half done."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Calls write(tmp) on a temporary path beside `target`, then renames it into place: readers
    see the old file or the new one, never part of one. The temporary name is unique, so nodes
    preparing one shared folder at once do not write into each other's files."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
