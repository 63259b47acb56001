"""Where the fast engine's compile cache can live, decided before numba sees
the first ``cache=True`` function.

numba caches next to each source file (``__pycache__``), else in
``NUMBA_CACHE_DIR``, else in the user's cache directory; when none of them
is writable (a read-only install and a read-only home), decorating the
first function fails with "no locator available". :func:`ensure_location`
looks first, with the same test numba makes (create the directory, create
a file in it): if the usual places fail it picks a private directory under
the system's temporary directory, and if that fails too it runs uncached
(every function compiles in every process). Either change is said once on
stderr. Numba-free, so importing the engines stays cheap when nothing is
wrong; numba is imported only to run uncached.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

_PACKAGE = Path(__file__).resolve().parent.parent
#: Directories holding functions the engine compiles with ``cache=True``
#: (numba caches beside the source of the Python function it compiles: the
#: engine's own, the visitors and MMU hooks of the model, the kernel rules
#: and memstress's generator).
SOURCE_DIRS = (_PACKAGE / "engine", _PACKAGE / "model" / "pgtable", _PACKAGE / "model" / "kvm",
               _PACKAGE / "arm64", _PACKAGE / "selftest")


def writable(directory: Path) -> bool:
    """numba's own test: the directory can be made and a file created in it."""
    try:
        os.makedirs(directory, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
        return True
    except OSError:
        return False


def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "numba"


def private_cache() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"s2split-numba-cache-{uid}"


def choose(is_writable: Callable[[Path], bool] = writable) -> tuple[str, Path | None]:
    """("as is", None) when numba will find a place itself; ("private", DIR)
    when DIR must be given to numba; ("uncached", None) when nothing is
    writable."""
    given = os.environ.get("NUMBA_CACHE_DIR")
    if given and is_writable(Path(given)):
        return "as is", None
    if not given and (all(is_writable(d / "__pycache__") for d in SOURCE_DIRS) or
                      is_writable(_user_cache())):
        return "as is", None
    private = private_cache()
    if is_writable(private):
        return "private", private
    return "uncached", None


_said = False


def _say_once(line: str) -> None:
    global _said
    if _said:
        return
    _said = True
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def run_uncached() -> None:
    """Every function compiled from now on keeps no cache."""
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    def enable_caching(self: Dispatcher) -> None:
        self._cache = NullCache()
    Dispatcher.enable_caching = enable_caching  # type: ignore[method-assign]


def ensure_location() -> str:
    """Make sure numba has a writable cache location, or runs uncached."""
    how, where = choose()
    if how == "private":
        os.environ["NUMBA_CACHE_DIR"] = str(where)
        config = sys.modules.get("numba.core.config")
        if config is not None:
            config.CACHE_DIR = str(where)  # type: ignore[attr-defined]
        _say_once(f"s2split: no writable compile cache beside the sources or in the user's "
                  f"cache directory; caching in {where}")
    elif how == "uncached":
        run_uncached()
        _say_once("s2split: no writable location for the compile cache; the fast engine "
                  "compiles afresh in every process")
    return how
