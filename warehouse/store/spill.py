"""Spill folders of sandboxed queries (`warehouse.store.db.sandbox`): named after their process, so that the
folders of processes that are gone (a `plasticity sql` killed with SIGKILL) can be removed."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


#: Spill folders of sandboxed queries: <tmp>/plasticity-sql-<pid>-<random>.
SPILL_PREFIX = "plasticity-sql-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_spill_folders(folder: str | os.PathLike | None = None) -> list[Path]:
    """Remove the spill folders whose process is gone (a `plasticity sql` killed with SIGKILL cannot remove
    its own); returns them. Folders of running processes and of other users are left alone."""
    removed = []
    for path in Path(folder or tempfile.gettempdir()).glob(f"{SPILL_PREFIX}*"):
        pid = path.name[len(SPILL_PREFIX):].split("-", 1)[0]
        try:
            mine = path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
