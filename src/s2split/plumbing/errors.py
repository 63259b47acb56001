"""Errors and the kernel's errno values.

Stage-2 operations return ``0`` or a negative errno, exactly like their kernel
counterparts (``-EAGAIN`` from a map is a normal outcome, not an exception).
Bad input to the Python API raises :class:`S2Error`, whose message is one line
meant for a human; the command line turns it into ``error: ...`` and exit 2.
"""

from __future__ import annotations

EPERM = 1
ENOENT = 2
EIO = 5
E2BIG = 7
ENOEXEC = 8
EAGAIN = 11
ENOMEM = 12
EFAULT = 14
EEXIST = 17
EINVAL = 22
ERANGE = 34

ERRNO_NAMES = {
    EPERM: "EPERM",
    ENOENT: "ENOENT",
    EIO: "EIO",
    E2BIG: "E2BIG",
    ENOEXEC: "ENOEXEC",
    EAGAIN: "EAGAIN",
    ENOMEM: "ENOMEM",
    EFAULT: "EFAULT",
    EEXIST: "EEXIST",
    EINVAL: "EINVAL",
    ERANGE: "ERANGE",
}


def errno_name(ret: int) -> str:
    """``-22`` -> ``"-EINVAL"``; ``0`` -> ``"0"``."""
    if ret == 0:
        return "0"
    name = ERRNO_NAMES.get(-ret)
    return f"-{name}" if name else str(ret)


class S2Error(ValueError):
    """Invalid input or configuration; the message is a complete sentence."""


class KernelError(S2Error):
    """A modelled kernel interface refused the request with an errno.

    Raised by the KVM layer where userspace would see an ioctl fail, so that
    callers get the errno and a message naming the kernel's rule.
    """

    def __init__(self, errno: int, message: str):
        super().__init__(f"{message} ({ERRNO_NAMES.get(errno, errno)})")
        self.errno = errno
        self.message = message

    def __reduce__(self):  # pickled with the arguments __init__ takes (worker errors)
        return (type(self), (self.errno, self.message))


def require_int(name: str, value: object, *, minimum: int = 0) -> int:
    """Return ``value`` as an int, or raise a one-line :class:`S2Error`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise S2Error(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise S2Error(f"{name} must be >= {minimum:#x}, got {value:#x}" if minimum else
                      f"{name} must not be negative, got {value}")
    return value
