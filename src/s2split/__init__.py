"""s2split: how much work arm64 KVM's stage-2 code does when it splits huge
pages for dirty logging, and how much walker optimizations save.

The package's folders are its layers, each importing only from those below
it (the import-linter contracts in pyproject.toml): ``cli``, ``report``,
``tasks``, ``hw``, ``estimate``, ``storage``, ``workload``, ``engine``,
``model``, ``selftest`` and ``counting``, ``arm64``, ``plumbing``. Module
names from before that layout still import (:mod:`s2split.plumbing.moved`).
"""

from .plumbing import moved as _moved

_moved.install()

#: Part of every stored cell's key: bump it whenever any count can change, so
#: that a results store never reuses counts of an older model.
__version__ = "0.2.0"
