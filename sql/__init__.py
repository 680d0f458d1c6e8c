"""SQL run by `warehouse/`, one statement (or script) per file."""

from functools import lru_cache
from importlib.resources import files


@lru_cache(maxsize=None)
def load(name: str) -> str:
    """Text of sql/<name>.sql."""
    return files(__name__).joinpath(f"{name}.sql").read_text()
