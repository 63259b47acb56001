"""A KVM userspace driver on ``/dev/kvm``, standard library only.

Everything goes through ``fcntl.ioctl`` on the KVM file descriptors, with the
argument structures packed by :mod:`struct` (layouts from the kernel's UAPI
header ``linux/kvm.h``), host memory from :mod:`mmap`, and addresses of Python
buffers from :mod:`ctypes`. No numpy, no C to compile: this runs on a minimal
Python, e.g. inside a small arm64 VM.

Objects: :class:`Kvm` (the system fd: API version, capabilities),
:class:`Vm` (a VM fd: capabilities, memslots, dirty log), :class:`Vcpu` (a
vCPU fd and its mmapped ``struct kvm_run``), :class:`HostMemory` (the backing
of a memslot). Failures raise :class:`KvmError` (an :class:`S2Error`) whose
message names the ioctl and what it was asked to do.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import mmap
import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

from ..arm64.uapi import (KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES,
                          KVM_CAP_ARM_VM_IPA_SIZE, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_IMMEDIATE_EXIT,
                          KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_MAX_VCPUS, KVM_CAP_NR_MEMSLOTS,
                          KVM_CAP_ONE_REG, KVM_CAP_USER_MEMORY, KVM_CAP_USER_MEMORY2,
                          KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
from ..plumbing.errors import S2Error

KVM_DEVICE = "/dev/kvm"
KVM_API_VERSION = 12


# -- ioctl numbers (asm-generic encoding, the same on x86-64 and arm64) ------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# struct sizes (linux/kvm.h, asm/kvm.h)
_USER_MEMORY_REGION = struct.Struct("<IIQQQ")  # slot, flags, gpa, size, uaddr: 32 bytes
_USER_MEMORY_REGION2 = struct.Struct("<IIQQQQII112x")  # + memfd offset, memfd, pad: 160
_DIRTY_LOG = struct.Struct("<IIQ")  # slot, padding, bitmap pointer: 16
_CLEAR_DIRTY_LOG = struct.Struct("<IIQQ")  # slot, num_pages, first_page, bitmap: 24
_ENABLE_CAP = struct.Struct("<II4Q64x")  # cap, flags, args[4], pad[64]: 104
_ONE_REG = struct.Struct("<QQ")  # id, addr: 16
_VCPU_INIT = struct.Struct("<I7I")  # target, features[7]: 32
_X86_REGS = struct.Struct("<18Q")  # rax..r15, rip, rflags: 144
_X86_SREGS_SIZE = 312  # 8 segments x 24 + 2 dtables x 16 + 7 x u64 + 4 x u64
_CPUID2_HEADER = struct.Struct("<II")  # nent, padding
_CPUID_ENTRY2 = struct.Struct("<7I12x")  # function, index, flags, eax..edx, pad: 40

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, _CPUID2_HEADER.size)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, _DIRTY_LOG.size)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, _USER_MEMORY_REGION.size)
KVM_SET_USER_MEMORY_REGION2 = _iow(0x49, _USER_MEMORY_REGION2.size)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, _X86_REGS.size)
KVM_SET_REGS = _iow(0x82, _X86_REGS.size)
KVM_GET_SREGS = _ior(0x83, _X86_SREGS_SIZE)
KVM_SET_SREGS = _iow(0x84, _X86_SREGS_SIZE)
KVM_SET_CPUID2 = _iow(0x90, _CPUID2_HEADER.size)
KVM_ENABLE_CAP = _iow(0xA3, _ENABLE_CAP.size)
KVM_GET_ONE_REG = _iow(0xAB, _ONE_REG.size)
KVM_SET_ONE_REG = _iow(0xAC, _ONE_REG.size)
KVM_ARM_VCPU_INIT = _iow(0xAE, _VCPU_INIT.size)
KVM_ARM_PREFERRED_TARGET = _ior(0xAF, _VCPU_INIT.size)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, _CLEAR_DIRTY_LOG.size)

IOCTL_NAMES = {v: k for k, v in list(globals().items())
               if k.startswith("KVM_") and isinstance(v, int) and (v >> 8) & 0xFF == KVMIO}

# -- capabilities ----------------------------------------------------------------
CAP_NAMES = {
    KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY",
    KVM_CAP_NR_MEMSLOTS: "KVM_CAP_NR_MEMSLOTS",
    KVM_CAP_MAX_VCPUS: "KVM_CAP_MAX_VCPUS",
    KVM_CAP_ONE_REG: "KVM_CAP_ONE_REG",
    KVM_CAP_IMMEDIATE_EXIT: "KVM_CAP_IMMEDIATE_EXIT",
    KVM_CAP_ARM_VM_IPA_SIZE: "KVM_CAP_ARM_VM_IPA_SIZE",
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    KVM_CAP_DIRTY_LOG_RING: "KVM_CAP_DIRTY_LOG_RING",
    KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE: "KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE",
    KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES: "KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES",
    KVM_CAP_USER_MEMORY2: "KVM_CAP_USER_MEMORY2",
}


# -- exits -------------------------------------------------------------------------
EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT",
              6: "MMIO", 7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR",
              17: "INTERNAL_ERROR", 24: "SYSTEM_EVENT", 28: "ARM_NISV"}
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

# struct kvm_run: exit_reason at 8, the exit union at 32
_RUN_EXIT_REASON = 8
_RUN_UNION = 32
_RUN_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data[8], len, is_write

# -- arm64 registers (KVM_{GET,SET}_ONE_REG) ---------------------------------------------
KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_ARM_CORE = 0x0010 << 16


def arm64_core_reg(offset_bytes: int) -> int:
    """The ONE_REG id of a 64-bit field of ``struct kvm_regs`` at this byte offset."""
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (offset_bytes // 4)


def arm64_xreg(n: int) -> int:
    """x0..x30 (``user_pt_regs.regs[n]``)."""
    if not 0 <= n <= 30:
        raise S2Error(f"there is no AArch64 register x{n}")
    return arm64_core_reg(8 * n)


ARM64_REG_SP = arm64_core_reg(8 * 31)
ARM64_REG_PC = arm64_core_reg(8 * 32)
ARM64_REG_PSTATE = arm64_core_reg(8 * 33)

HOST_ARCH = platform.machine()
ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


def host_arch() -> str:
    """``"x86_64"`` or ``"arm64"``, or raise: the harness drives only these two."""
    arch = ARCHES.get(HOST_ARCH.lower())
    if arch is None:
        raise S2Error(f"the KVM harness supports arm64 and x86-64 hosts, not {HOST_ARCH}")
    return arch


class KvmError(S2Error):
    """A KVM ioctl failed (or KVM is missing); the message is one sentence."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno

    def __reduce__(self):  # keep the errno across a pickle round trip
        return (type(self), (str(self), self.errno))


def _errstr(e: OSError) -> str:
    name = _errno.errorcode.get(e.errno or 0, str(e.errno))
    return f"{name}: {os.strerror(e.errno)}" if e.errno else str(e)


def _failed(request: int, what: str, e: OSError) -> KvmError:
    name = IOCTL_NAMES.get(request, f"ioctl {request:#x}")
    return KvmError(f"{name} failed{' ' + what if what else ''} ({_errstr(e)})", e.errno)


def _ioctl(fd: int, request: int, arg: int | bytearray = 0, what: str = "") -> int:
    """``ioctl()`` that retries on EINTR and raises :class:`KvmError`."""
    while True:
        try:
            if isinstance(arg, bytearray):
                return fcntl.ioctl(fd, request, arg, True)
            return fcntl.ioctl(fd, request, arg)
        except InterruptedError:
            continue
        except OSError as e:
            raise _failed(request, what, e) from None


_libc_ioctl = None


def _interruptible_ioctl(fd: int, request: int, what: str = "") -> int:
    """``ioctl(fd, request, 0)`` through libc, returning ``-EINTR`` when a
    signal interrupts it: from Python 3.14 ``fcntl.ioctl`` retries EINTR
    itself, which would put a signalled vCPU straight back into KVM_RUN.
    ctypes releases the GIL for the call, as ``fcntl.ioctl`` does."""
    global _libc_ioctl
    if _libc_ioctl is None:
        fn = ctypes.CDLL(None, use_errno=True).ioctl
        fn.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
        fn.restype = ctypes.c_int
        _libc_ioctl = fn
    ret = _libc_ioctl(fd, request, 0)
    if ret >= 0:
        return ret
    err = ctypes.get_errno()
    if err == _errno.EINTR:
        return -err
    raise _failed(request, what, OSError(err, os.strerror(err))) from None


def _address(buf) -> int:
    """The address of a ctypes object."""
    return ctypes.addressof(buf)


# -- host memory -------------------------------------------------------------------
MAP_HUGETLB = 0x40000
MAP_HUGE_SHIFT = 26
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", 15)
THP_DIR = Path("/sys/kernel/mm/transparent_hugepage")
HUGETLB_SIZES = {"16kb": 1 << 14, "64kb": 1 << 16, "512kb": 1 << 19, "1mb": 1 << 20,
                 "2mb": 1 << 21, "8mb": 1 << 23, "16mb": 1 << 24, "32mb": 1 << 25,
                 "256mb": 1 << 28, "512mb": 1 << 29, "1gb": 1 << 30, "2gb": 1 << 31,
                 "16gb": 1 << 34}


def host_page_size() -> int:
    return mmap.PAGESIZE


def thp_configured() -> bool:
    return THP_DIR.is_dir()


def thp_size() -> int:
    """``hpage_pmd_size``: the transparent hugepage size."""
    try:
        return int((THP_DIR / "hpage_pmd_size").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        raise S2Error("transparent hugepages are not configured in this kernel "
                      f"({THP_DIR}/hpage_pmd_size is not readable), so anonymous_thp "
                      "cannot be used") from None


def default_hugetlb_size() -> int:
    """``Hugepagesize`` from /proc/meminfo."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    raise S2Error("hugetlbfs is not configured in this kernel (no Hugepagesize in "
                  "/proc/meminfo), so anonymous_hugetlb cannot be used")


def backing_page_size(name: str) -> int:
    """``get_backing_src_pagesz()`` on this host, for an ``-s`` name."""
    key = name.strip().lower()
    if key == "anonymous":
        return host_page_size()
    if key == "anonymous_thp":
        return thp_size()
    if key == "anonymous_hugetlb":
        return default_hugetlb_size()
    suffix = key.removeprefix("anonymous_hugetlb_")
    if key.startswith("anonymous_hugetlb_") and suffix in HUGETLB_SIZES:
        return HUGETLB_SIZES[suffix]
    raise S2Error(f"unknown backing src type {name!r}: choose from anonymous, anonymous_thp, "
                  "anonymous_hugetlb or anonymous_hugetlb_SIZE (e.g. anonymous_hugetlb_2mb)")


class HostMemory:
    """Host memory for a memslot, mapped the way the selftests map it.

    * ``anonymous``: private anonymous memory, ``MADV_NOHUGEPAGE`` (when THP
      is configured) so that it is backed by base pages;
    * ``anonymous_thp``: padded by one hugepage so that the memory can start on
      a hugepage boundary, ``MADV_HUGEPAGE``;
    * ``anonymous_hugetlb[_SIZE]``: ``MAP_HUGETLB`` with the size in the flags
      (bits 26+), the default hugepage size without a suffix.
    """

    def __init__(self, size: int, backing: str = "anonymous"):
        self.backing = backing.strip().lower()
        self.page_size = backing_page_size(self.backing)
        if size <= 0 or size % self.page_size:
            raise S2Error(f"memory size {size:#x} is not a multiple of the {self.backing} page "
                          f"size {self.page_size:#x}")
        self.size = size
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20)
        pad = 0
        if self.backing == "anonymous_thp":
            pad = self.page_size
        elif self.backing.startswith("anonymous_hugetlb"):
            flags |= MAP_HUGETLB
            if self.backing != "anonymous_hugetlb":
                flags |= (self.page_size.bit_length() - 1) << MAP_HUGE_SHIFT
        try:
            self._map = mmap.mmap(-1, size + pad, flags=flags,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            if self.backing.startswith("anonymous_hugetlb"):
                kb = self.page_size >> 10
                if not Path(f"/sys/kernel/mm/hugepages/hugepages-{kb}kB").is_dir():
                    raise S2Error(f"this kernel has no {kb} kB hugepages (no /sys/kernel/mm/"
                                  f"hugepages/hugepages-{kb}kB), so {self.backing} cannot be "
                                  "used") from None
                raise S2Error(f"cannot map {size >> 20} MiB of {self.backing} memory "
                              f"({_errstr(e)}): reserve enough {kb} kB hugepages in "
                              f"/sys/kernel/mm/hugepages/hugepages-{kb}kB/nr_hugepages") from None
            raise S2Error(f"cannot map {size:#x} bytes of {self.backing} memory "
                          f"({_errstr(e)})") from None
        self._cbuf = (ctypes.c_char * (size + pad)).from_buffer(self._map)
        base = _address(self._cbuf)
        self.offset = (-base) % pad if pad else 0
        self.address = base + self.offset
        if self.backing in ("anonymous", "anonymous_thp") and thp_configured():
            advice = MADV_NOHUGEPAGE if self.backing == "anonymous" else MADV_HUGEPAGE
            try:
                self._map.madvise(advice, self.offset, size)
            except OSError as e:
                self.close()
                raise S2Error(f"madvise({'MADV_NOHUGEPAGE' if advice == MADV_NOHUGEPAGE else 'MADV_HUGEPAGE'}) "
                              f"failed on {self.backing} memory ({_errstr(e)})") from None

    def view(self) -> memoryview:
        """The memory as bytes (offset 0 is :attr:`address`)."""
        return memoryview(self._map)[self.offset:self.offset + self.size]

    def read_u64(self, offset: int) -> int:
        return struct.unpack_from("<Q", self._map, self.offset + offset)[0]

    def write(self, offset: int, data: bytes) -> None:
        self._map[self.offset + offset:self.offset + offset + len(data)] = data

    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            self._cbuf = None
            try:
                self._map.close()
            except BufferError:  # a view is still alive; the GC unmaps later
                pass
            self._map = None


@dataclass
class Memslot:
    slot: int
    gpa: int
    size: int
    memory: HostMemory
    flags: int = 0

    @property
    def pages(self) -> int:
        """Host pages: the unit of the dirty bitmap."""
        return self.size // host_page_size()


# -- the system fd -------------------------------------------------------------------
class Kvm:
    """``/dev/kvm``."""

    def __init__(self, path: str = KVM_DEVICE):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(f"{path} does not exist: this machine has no KVM (load the kvm "
                           "module, or enable virtualization for this VM)") from None
        except PermissionError:
            raise KvmError(f"{path} is not accessible to this user (add the user to the "
                           "kvm group or run as root)") from None
        except OSError as e:
            raise KvmError(f"cannot open {path} ({_errstr(e)})") from None
        version = _ioctl(self.fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            self.close()
            raise KvmError(f"{path} speaks KVM API version {version}, not {KVM_API_VERSION}")
        self.vcpu_mmap_size = _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap,
                      f"for {CAP_NAMES.get(cap, cap)}")

    def supported_cpuid(self) -> bytearray:
        """x86: ``KVM_GET_SUPPORTED_CPUID`` as a ``struct kvm_cpuid2`` buffer."""
        nent = 128
        while True:
            buf = bytearray(_CPUID2_HEADER.size + nent * _CPUID_ENTRY2.size)
            _CPUID2_HEADER.pack_into(buf, 0, nent, 0)
            try:
                _ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as e:
                if e.errno == _errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            n = _CPUID2_HEADER.unpack_from(buf, 0)[0]
            return buf[:_CPUID2_HEADER.size + n * _CPUID_ENTRY2.size]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cpuid_entries(buf: bytes) -> list[tuple[int, int, int, int, int, int, int]]:
    """(function, index, flags, eax, ebx, ecx, edx) of a ``struct kvm_cpuid2``."""
    n = _CPUID2_HEADER.unpack_from(buf, 0)[0]
    return [_CPUID_ENTRY2.unpack_from(buf, _CPUID2_HEADER.size + i * _CPUID_ENTRY2.size)[:7]
            for i in range(n)]


# -- a VM ------------------------------------------------------------------------------
class Vm:
    """A VM fd. ``ipa_bits`` (arm64) goes into ``KVM_CREATE_VM``'s type as
    ``KVM_VM_TYPE_ARM_IPA_SIZE(ipa_bits)``; x86 has no such type."""

    def __init__(self, kvm: Kvm, ipa_bits: int | None = None):
        self.kvm = kvm
        self.arch = host_arch()
        vm_type = 0
        if ipa_bits is not None and self.arch == "arm64":
            limit = kvm.check_extension(KVM_CAP_ARM_VM_IPA_SIZE)
            if limit == 0 and ipa_bits != 40:
                raise KvmError(f"this kernel does not support KVM_CAP_ARM_VM_IPA_SIZE, so "
                               f"only 40-bit IPA VMs can be created, not {ipa_bits}-bit")
            if limit and ipa_bits > limit:
                raise KvmError(f"a {ipa_bits}-bit IPA space is larger than this host supports "
                               f"(KVM_CAP_ARM_VM_IPA_SIZE = {limit})")
            if limit and ipa_bits < 32:
                raise KvmError(f"a {ipa_bits}-bit IPA space is smaller than KVM's minimum of 32")
            vm_type = ipa_bits & 0xFF if limit else 0
        self.ipa_bits = ipa_bits
        self.fd = _ioctl(kvm.fd, KVM_CREATE_VM, vm_type,
                         f"(type {vm_type:#x})")
        self.memslots: dict[int, Memslot] = {}
        self.vcpus: list[Vcpu] = []
        self.user_memory2 = self.check_extension(KVM_CAP_USER_MEMORY2) > 0
        self.manual_protect = 0

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (per-VM answers, e.g. the IPA)."""
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap,
                      f"for {CAP_NAMES.get(cap, cap)}")

    def enable_cap(self, cap: int, *args: int) -> None:
        a = list(args) + [0] * (4 - len(args))
        buf = bytearray(_ENABLE_CAP.pack(cap, 0, *a))
        _ioctl(self.fd, KVM_ENABLE_CAP, buf,
               f"for {CAP_NAMES.get(cap, cap)} with {', '.join(hex(x) for x in args)}")

    # -- capabilities of the harness -------------------------------------------------
    def supported_block_sizes(self) -> int:
        """``KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES``: a bitmap of block sizes (0: none)."""
        return self.check_extension(KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES)

    def set_eager_split_chunk_size(self, chunk: int) -> None:
        """``KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE`` (before any memslot)."""
        if self.memslots:
            raise S2Error("the eager-split chunk size must be set before the first memslot")
        # KVM_CHECK_EXTENSION(KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE) answers the current
        # chunk size (0 by default), which does not tell support from its absence;
        # KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES came with it (Linux 6.5) and is never 0.
        blocks = self.supported_block_sizes()
        if not blocks:
            where = "x86-64 KVM has no such capability" if self.arch == "x86_64" else \
                "it needs Linux 6.5 or newer on arm64"
            raise KvmError("KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE is not supported by this "
                           f"kernel ({where}), so --chunk-size cannot be set")
        if chunk and not chunk & blocks:
            sizes = ", ".join(_size_name(1 << b) for b in range(64) if blocks >> b & 1)
            raise KvmError(f"chunk size {_size_name(chunk)} is not 0 or a supported block size "
                           f"of this VM (KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES: {sizes or 'none'})")
        self.enable_cap(KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, chunk)

    def enable_manual_protect(self, flags: int = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE |
                              KVM_DIRTY_LOG_INITIALLY_SET) -> int:
        """``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` with the flags the host supports
        among ``flags``; returns the flags enabled."""
        supported = self.kvm.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        if not supported:
            raise KvmError("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not supported by this kernel "
                           "(it needs Linux 5.3 or newer); run without manual protect (-g)")
        want = flags & supported
        if want != flags:
            missing = flags & ~supported
            raise KvmError(f"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags {missing:#x} are not "
                           f"supported by this kernel (it offers {supported:#x})")
        self.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, want)
        self.manual_protect = want
        return want

    # -- memslots ----------------------------------------------------------------------
    def _set_region(self, ms: Memslot, flags: int, size: int | None = None) -> None:
        size = ms.size if size is None else size
        what = (f"for slot {ms.slot} at [{ms.gpa:#x}, {ms.gpa + ms.size:#x}) with flags "
                f"{flags:#x}")
        if self.user_memory2:
            buf = bytearray(_USER_MEMORY_REGION2.pack(ms.slot, flags, ms.gpa, size,
                                                      ms.memory.address, 0, 0, 0))
            _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION2, buf, what)
        else:
            buf = bytearray(_USER_MEMORY_REGION.pack(ms.slot, flags, ms.gpa, size,
                                                     ms.memory.address))
            _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, buf, what)

    def add_memslot(self, slot: int, gpa: int, memory: HostMemory, flags: int = 0) -> Memslot:
        if slot in self.memslots:
            raise S2Error(f"memslot {slot} already exists")
        ms = Memslot(slot, gpa, memory.size, memory, flags)
        self._set_region(ms, flags)
        self.memslots[slot] = ms
        return ms

    def set_memslot_flags(self, slot: int, flags: int) -> None:
        ms = self.memslots[slot]
        self._set_region(ms, flags)
        ms.flags = flags

    def delete_memslot(self, slot: int) -> None:
        ms = self.memslots.pop(slot)
        self._set_region(ms, 0, size=0)

    # -- dirty log ------------------------------------------------------------------------
    def new_bitmap(self, slot: int) -> ctypes.Array:
        """A zeroed bitmap buffer for ``slot`` (64-bit words, as KVM copies them)."""
        pages = self.memslots[slot].pages
        return ctypes.create_string_buffer((pages + 63) // 64 * 8)

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array | None = None) -> ctypes.Array:
        """``KVM_GET_DIRTY_LOG`` into ``bitmap`` (a new one if None)."""
        if bitmap is None:
            bitmap = self.new_bitmap(slot)
        buf = bytearray(_DIRTY_LOG.pack(slot, 0, _address(bitmap)))
        _ioctl(self.fd, KVM_GET_DIRTY_LOG, buf, f"for slot {slot}")
        return bitmap

    def clear_dirty_log(self, slot: int, bitmap: ctypes.Array, first_page: int = 0,
                        num_pages: int | None = None) -> None:
        """``KVM_CLEAR_DIRTY_LOG``: re-protect the pages whose bits are set in
        ``bitmap`` (bit 0 is ``first_page``)."""
        if num_pages is None:
            num_pages = self.memslots[slot].pages - first_page
        buf = bytearray(_CLEAR_DIRTY_LOG.pack(slot, num_pages, first_page, _address(bitmap)))
        _ioctl(self.fd, KVM_CLEAR_DIRTY_LOG, buf,
               f"for slot {slot}, pages {first_page}..{first_page + num_pages - 1}")

    # -- vCPUs ----------------------------------------------------------------------------
    def create_vcpu(self) -> "Vcpu":
        vcpu = Vcpu(self, len(self.vcpus))
        self.vcpus.append(vcpu)
        return vcpu

    def arm_preferred_target(self) -> bytes:
        buf = bytearray(_VCPU_INIT.size)
        _ioctl(self.fd, KVM_ARM_PREFERRED_TARGET, buf)
        return bytes(buf)

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1
        for ms in self.memslots.values():
            ms.memory.close()
        self.memslots = {}

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bitmap_pages(bitmap: ctypes.Array | bytes, npages: int) -> list[int]:
    """The page indexes whose bits are set (little-endian 64-bit words)."""
    raw = bytes(bitmap)
    out = []
    for word_i in range(0, (npages + 63) // 64):
        word = int.from_bytes(raw[word_i * 8:word_i * 8 + 8], "little")
        while word:
            low = word & -word
            bit = word_i * 64 + low.bit_length() - 1
            if bit < npages:
                out.append(bit)
            word ^= low
    return out


def bitmap_count(bitmap: ctypes.Array | bytes) -> int:
    return int.from_bytes(bytes(bitmap), "little").bit_count()


class Vcpu:
    """A vCPU fd and its ``struct kvm_run``."""

    def __init__(self, vm: Vm, index: int):
        self.vm = vm
        self.index = index
        self.fd = _ioctl(vm.fd, KVM_CREATE_VCPU, index, f"for vCPU {index}")
        try:
            self.run_map = mmap.mmap(self.fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                     mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(self.fd)
            raise KvmError(f"cannot mmap struct kvm_run of vCPU {index} ({_errstr(e)})") from None

    # arm64 --------------------------------------------------------------------------------
    def arm_init(self, target: bytes, features: int = 0) -> None:
        t = struct.unpack_from("<I", target, 0)[0]
        buf = bytearray(_VCPU_INIT.pack(t, features, 0, 0, 0, 0, 0, 0))
        _ioctl(self.fd, KVM_ARM_VCPU_INIT, buf, f"for vCPU {self.index} (target {t})")

    def set_one_reg(self, reg_id: int, value: int) -> None:
        val = ctypes.c_uint64(value & (2**64 - 1))
        buf = bytearray(_ONE_REG.pack(reg_id, _address(val)))
        _ioctl(self.fd, KVM_SET_ONE_REG, buf, f"for register {reg_id:#x} of vCPU {self.index}")

    def get_one_reg(self, reg_id: int) -> int:
        val = ctypes.c_uint64(0)
        buf = bytearray(_ONE_REG.pack(reg_id, _address(val)))
        _ioctl(self.fd, KVM_GET_ONE_REG, buf, f"for register {reg_id:#x} of vCPU {self.index}")
        return val.value

    # x86 ----------------------------------------------------------------------------------
    def get_regs(self) -> list[int]:
        buf = bytearray(_X86_REGS.size)
        _ioctl(self.fd, KVM_GET_REGS, buf)
        return list(_X86_REGS.unpack(buf))

    def set_regs(self, regs: list[int]) -> None:
        _ioctl(self.fd, KVM_SET_REGS, bytearray(_X86_REGS.pack(*regs)),
               f"for vCPU {self.index}")

    def get_sregs(self) -> bytearray:
        buf = bytearray(_X86_SREGS_SIZE)
        _ioctl(self.fd, KVM_GET_SREGS, buf)
        return buf

    def set_sregs(self, buf: bytearray) -> None:
        _ioctl(self.fd, KVM_SET_SREGS, buf, f"for vCPU {self.index}")

    def set_cpuid(self, cpuid: bytes) -> None:
        _ioctl(self.fd, KVM_SET_CPUID2, bytearray(cpuid), f"for vCPU {self.index}")

    # running -------------------------------------------------------------------------------
    @property
    def exit_reason(self) -> int:
        return struct.unpack_from("<I", self.run_map, _RUN_EXIT_REASON)[0]

    def mmio(self) -> tuple[int, bytes, int, bool]:
        addr, data, length, is_write = _RUN_MMIO.unpack_from(self.run_map, _RUN_UNION)
        return addr, data[:length], length, bool(is_write)

    def run(self) -> int:
        """One ``KVM_RUN``; returns the exit reason, ``KVM_EXIT_INTR`` when a
        signal to this thread interrupted it."""
        if _interruptible_ioctl(self.fd, KVM_RUN, f"for vCPU {self.index}") < 0:
            return KVM_EXIT_INTR
        return self.exit_reason

    def describe_exit(self) -> str:
        reason = self.exit_reason
        name = EXIT_NAMES.get(reason, str(reason))
        if reason == KVM_EXIT_MMIO:
            addr, data, length, is_write = self.mmio()
            return (f"MMIO {'write' if is_write else 'read'} of {length} bytes at {addr:#x}")
        if reason == KVM_EXIT_FAIL_ENTRY:
            code = struct.unpack_from("<Q", self.run_map, _RUN_UNION)[0]
            return f"FAIL_ENTRY (hardware entry failure reason {code:#x})"
        if reason == KVM_EXIT_INTERNAL_ERROR:
            sub = struct.unpack_from("<I", self.run_map, _RUN_UNION)[0]
            return f"INTERNAL_ERROR (suberror {sub})"
        if reason == KVM_EXIT_SHUTDOWN:
            return "SHUTDOWN (the guest crashed: triple fault)"
        if reason == KVM_EXIT_SYSTEM_EVENT:
            kind = struct.unpack_from("<I", self.run_map, _RUN_UNION)[0]
            return f"SYSTEM_EVENT (type {kind})"
        return name

    def close(self) -> None:
        if getattr(self, "run_map", None) is not None:
            self.run_map.close()
            self.run_map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _size_name(n: int) -> str:
    for shift, unit in ((40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def size_name(n: int) -> str:
    """``2M``, ``64K``, ``1G``... (numpy-free, like :func:`s2split.arm64.arch.size_name`)."""
    return _size_name(n)
