"""A VM that runs the guest program: memslot 0, the vCPUs, the passes.

Memslot 0 (1 MiB at guest physical 0, anonymous) holds the guest code at
:data:`CODE_GPA`, the control block at :data:`CTL_GPA` and, on x86-64, the
page tables. The MMIO doorbell :data:`MMIO_GPA` lies just past it, in no
memslot. Test memory goes in memslots 1.. at the addresses the caller gives
(the memstress layout, at the top of the guest physical space).

* arm64: ``KVM_ARM_PREFERRED_TARGET`` + ``KVM_ARM_VCPU_INIT``, then PC and
  x0..x5 with ``KVM_SET_ONE_REG``; the vCPU starts at EL1 with the MMU off,
  so guest virtual = guest physical.
* x86-64: the supported CPUID (so that the guest's MAXPHYADDR is the host's),
  64-bit long mode through ``KVM_SET_SREGS`` (CR0.PG|PE, CR4.PAE,
  EFER.LME|LMA, a 64-bit code segment, a 64-bit TSS) and identity page tables
  (guest virtual = guest physical): one 2M page over memslot 0 and the MMIO
  doorbell, 2M or 1G pages over the test region.

Each vCPU has a thread that runs one pass per :meth:`Machine.run_pass` (one
``KVM_RUN`` that ends at the MMIO doorbell); the GIL is released inside the
ioctl, so vCPUs run in parallel. A watchdog ends a pass that overruns
``pass_timeout``: a signal to each vCPU thread still in ``KVM_RUN`` makes the
ioctl return (``KVM_EXIT_INTR``), and the pass fails with a one-line error
instead of hanging the harness.
"""

from __future__ import annotations

import signal
import struct
import threading
import time
from dataclasses import dataclass

from ..plumbing.errors import S2Error
from . import guest as G
from .kvm import (ARM64_REG_PC, KVM_EXIT_INTR, KVM_EXIT_MMIO, HostMemory, Kvm, KvmError,
                  Memslot, Vcpu, Vm, arm64_xreg, cpuid_entries, host_arch, host_page_size,
                  size_name)

SYSTEM_SLOT = 0
SYSTEM_SIZE = 1 << 20
CODE_GPA = 0x1000
CTL_GPA = 0x2000
PT_GPA = 0x10000  # x86 page tables: 0x10000 up to the end of memslot 0
MMIO_GPA = SYSTEM_SIZE  # the first byte past memslot 0: no memslot there

_P, _RW, _PS = 1, 2, 0x80  # x86 page-table entry bits
_2M, _1G = 1 << 21, 1 << 30
_KICK = signal.SIGUSR1  # the watchdog's signal to a vCPU thread


@dataclass
class GuestVcpu:
    vcpu: Vcpu
    base: int
    pages: int
    seed: int


class Machine:
    """A VM set up to run the guest program (see the module docstring).

    ``ipa_bits``: arm64 creates the VM with that IPA size; x86-64 checks that
    the guest's MAXPHYADDR covers it. ``guest_page_size``: the size of the
    pages the guest writes one word into. ``x86_map``: the size of the x86
    guest page-table mappings of the test region (2M or 1G). ``pass_timeout``:
    seconds a pass may take before the watchdog stops it (``None``: no limit;
    the watchdog needs :meth:`run_pass` to be called from the main thread,
    which alone can install the signal handler).
    """

    def __init__(self, kvm: Kvm, ipa_bits: int, guest_page_size: int, x86_map: int = _2M,
                 pass_timeout: float | None = None):
        self.kvm = kvm
        self.arch = host_arch()
        self.ipa_bits = ipa_bits
        self.guest_page_size = guest_page_size
        if self.arch == "x86_64":
            if guest_page_size != 4096:
                raise S2Error(f"x86-64 guests use 4K pages, not {size_name(guest_page_size)}: "
                              "choose a 4K guest mode (-m 6, 3, 12 or 0)")
            if x86_map not in (_2M, _1G):
                raise S2Error("x86-64 guest page-table mappings are 2M or 1G")
            if ipa_bits > 47:
                raise S2Error(f"a {ipa_bits}-bit guest physical space cannot be identity-mapped "
                              "by 4-level x86-64 page tables (at most 47 bits); use a mode or "
                              "--ipa-bits of 47 or less")
        elif host_page_size() > guest_page_size:
            raise S2Error(f"{size_name(guest_page_size)} guest pages are smaller than this "
                          f"host's {size_name(host_page_size())} pages")
        self.x86_map = x86_map
        self.vm = Vm(kvm, ipa_bits if self.arch == "arm64" else None)
        self.vcpus: list[GuestVcpu] = []
        self._pt_next = PT_GPA
        self._pml4: int | None = None
        self._threads: list[threading.Thread] = []
        self._go: list[threading.Semaphore] = []
        self._done: list[threading.Semaphore] = []
        self._errors: list[BaseException | None] = []
        self._quit = False
        self.pass_timeout = pass_timeout
        self._expired = False
        self._cpuid: bytes | None = None
        self._target: bytes | None = None
        self.max_phys_bits: int | None = None
        if self.arch == "x86_64":
            self._cpuid = bytes(kvm.supported_cpuid())
            self.max_phys_bits = _x86_maxphyaddr(self._cpuid)
            if ipa_bits > self.max_phys_bits:
                self.vm.close()
                raise S2Error(f"a {ipa_bits}-bit guest physical space is larger than this "
                              f"host's guest MAXPHYADDR ({self.max_phys_bits} bits); use a "
                              "smaller mode or --ipa-bits")
            if x86_map == _1G and not _x86_has_1g_pages(self._cpuid):
                self.vm.close()
                raise S2Error("1G guest page-table mappings need CPUID pdpe1gb, which this "
                              "host's KVM does not offer; use 2M")

    # -- memory -------------------------------------------------------------------------
    def add_system_memory(self) -> None:
        """Memslot 0 with the guest code (call after the eager-split chunk size)."""
        mem = HostMemory(SYSTEM_SIZE, "anonymous")
        code = G.arm64_program() if self.arch == "arm64" else G.x86_program()
        mem.write(CODE_GPA, code)
        self.system = self.vm.add_memslot(SYSTEM_SLOT, 0, mem)
        if self.arch == "x86_64":
            self._pml4 = self._pt_page()
            self._map_x86(0, _2M, _2M)  # memslot 0 and the MMIO doorbell

    def add_test_memory(self, slot: int, gpa: int, size: int, backing: str) -> Memslot:
        mem = HostMemory(size, backing)
        try:
            ms = self.vm.add_memslot(slot, gpa, mem)
        except BaseException:
            mem.close()
            raise
        if self.arch == "x86_64":
            self._map_x86(gpa, size, self.x86_map)
        return ms

    def set_control(self, write_percent: int, random_access: bool, value: int) -> None:
        """The control block the guest reads at the start of each pass."""
        self.system.memory.write(CTL_GPA, struct.pack("<QQQ", write_percent,
                                                      int(random_access), value))

    # -- x86 page tables ------------------------------------------------------------------
    def _pt_page(self) -> int:
        gpa = self._pt_next
        if gpa + 4096 > SYSTEM_SIZE:
            raise S2Error("the test region needs more x86 page tables than memslot 0 holds; "
                          "use 1G guest mappings")
        self._pt_next += 4096
        return gpa

    def _entry(self, table: int, index: int) -> int:
        return self.system.memory.read_u64(table + 8 * index)

    def _set_entry(self, table: int, index: int, value: int) -> None:
        self.system.memory.write(table + 8 * index, struct.pack("<Q", value))

    def _next_table(self, table: int, index: int) -> int:
        e = self._entry(table, index)
        if e & _P:
            if e & _PS:
                raise S2Error("x86 guest page tables: a large page is in the way")
            return e & 0x000F_FFFF_FFFF_F000
        new = self._pt_page()
        self._set_entry(table, index, new | _P | _RW)
        return new

    def _map_x86(self, gpa: int, size: int, page: int) -> None:
        """Identity-map [gpa, gpa + size) rounded out to ``page`` (2M or 1G)."""
        assert self._pml4 is not None
        start = gpa - gpa % page
        end = gpa + size
        end += (-end) % page
        for addr in range(start, end, page):
            pdpt = self._next_table(self._pml4, addr >> 39 & 511)
            if page == _1G:
                self._set_entry(pdpt, addr >> 30 & 511, addr | _P | _RW | _PS)
            else:
                pd = self._next_table(pdpt, addr >> 30 & 511)
                self._set_entry(pd, addr >> 21 & 511, addr | _P | _RW | _PS)

    # -- vCPUs ------------------------------------------------------------------------------
    def add_vcpu(self, base: int, pages: int, seed: int) -> GuestVcpu:
        vcpu = self.vm.create_vcpu()
        if self.arch == "arm64":
            if self._target is None:
                self._target = self.vm.arm_preferred_target()
            vcpu.arm_init(self._target)
            regs = {0: base, 1: pages, 2: self.guest_page_size, 3: seed, 4: CTL_GPA,
                    5: MMIO_GPA}
            for n, value in regs.items():
                vcpu.set_one_reg(arm64_xreg(n), value)
            vcpu.set_one_reg(ARM64_REG_PC, CODE_GPA)
        else:
            assert self._cpuid is not None and self._pml4 is not None
            vcpu.set_cpuid(self._cpuid)
            vcpu.set_sregs(_x86_long_mode_sregs(vcpu.get_sregs(), self._pml4))
            regs = [0] * 18
            regs[5], regs[4], regs[13], regs[2] = base, pages, self.guest_page_size, seed
            regs[8], regs[9] = CTL_GPA, MMIO_GPA
            regs[16], regs[17] = CODE_GPA, 0x2  # rip; rflags (bit 1 is always set)
            vcpu.set_regs(regs)
        gv = GuestVcpu(vcpu, base, pages, seed)
        self.vcpus.append(gv)
        return gv

    def start_vcpu_threads(self) -> None:
        n = len(self.vcpus)
        self._go = [threading.Semaphore(0) for _ in range(n)]
        self._done = [threading.Semaphore(0) for _ in range(n)]
        self._errors = [None] * n
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True,
                                          name=f"vcpu{i}") for i in range(n)]
        for t in self._threads:
            t.start()

    def _worker(self, i: int) -> None:
        gv = self.vcpus[i]
        while True:
            self._go[i].acquire()
            if self._quit:
                return
            try:
                self._run_one_pass(gv)
            except BaseException as e:  # reported by run_pass in the main thread
                self._errors[i] = e
            self._done[i].release()

    def _run_one_pass(self, gv: GuestVcpu) -> None:
        v = gv.vcpu
        while True:
            reason = v.run()
            if reason == KVM_EXIT_INTR:
                if self._expired:
                    raise KvmError(f"vCPU {v.index} did not finish its pass within "
                                   f"{self.pass_timeout:g} s and was stopped (a hung guest, "
                                   "or a host too slow for the limit: see --pass-timeout)")
                continue
            if reason == KVM_EXIT_MMIO:
                addr, data, length, is_write = v.mmio()
                if addr == MMIO_GPA and is_write:
                    done = int.from_bytes(data, "little")
                    if done != gv.pages:
                        raise KvmError(f"vCPU {v.index} reported {done} pages done, not "
                                       f"{gv.pages}")
                    return
            raise KvmError(f"vCPU {v.index} stopped with an unexpected exit: "
                           f"{v.describe_exit()}")

    def run_pass(self) -> None:
        """Every vCPU makes one pass over its region; returns when all are done."""
        if not self._threads:
            self.start_vcpu_threads()
        watchdog = (self.pass_timeout is not None
                    and threading.current_thread() is threading.main_thread())
        if watchdog:
            # A Python handler, so that the signal interrupts KVM_RUN instead
            # of killing the process; it has nothing to do itself.
            previous = signal.signal(_KICK, lambda signum, frame: None)
        self._expired = False
        try:
            for g in self._go:
                g.release()
            if watchdog:
                self._watch()
            else:
                for d in self._done:
                    d.acquire()
        finally:
            if watchdog:
                signal.signal(_KICK, previous)
        for e in self._errors:
            if e is not None:
                self._errors = [None] * len(self._errors)
                raise e

    def _watch(self) -> None:
        assert self.pass_timeout is not None
        # beyond threading.TIMEOUT_MAX (about 292 years) is no limit at all
        deadline = time.monotonic() + min(self.pass_timeout, threading.TIMEOUT_MAX / 2)
        for thread, done in zip(self._threads, self._done):
            if done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                continue
            self._expired = True
            # Kick until the thread reports: a signal that lands just before
            # the thread enters KVM_RUN does not interrupt it.
            while not done.acquire(timeout=0.05):
                signal.pthread_kill(thread.ident, _KICK)

    def stop_vcpu_threads(self) -> None:
        self._quit = True
        for g in self._go:
            g.release()
        for t in self._threads:
            t.join()
        self._threads = []
        self._quit = False

    def close(self) -> None:
        if self._threads:
            self.stop_vcpu_threads()
        self.vm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- x86 helpers -------------------------------------------------------------------------
def _x86_maxphyaddr(cpuid: bytes) -> int:
    for function, index, _flags, eax, *_ in cpuid_entries(cpuid):
        if function == 0x80000008:
            return eax & 0xFF
    return 36  # KVM's default without leaf 0x80000008


def _x86_has_1g_pages(cpuid: bytes) -> bool:
    for function, _index, _flags, _eax, _ebx, _ecx, edx in cpuid_entries(cpuid):
        if function == 0x80000001:
            return bool(edx >> 26 & 1)
    return False


# struct kvm_sregs: cs, ds, es, fs, gs, ss, tr, ldt (struct kvm_segment, 24 bytes
# each: base, limit, selector, type, present, dpl, db, s, l, g, avl, unusable,
# padding), gdt, idt (struct kvm_dtable, 16 bytes), cr0, cr2, cr3, cr4, cr8,
# efer, apic_base, interrupt_bitmap[4].
_SEGMENT = struct.Struct("<QIH9Bx")
_SEG = {"cs": 0, "ds": 1, "es": 2, "fs": 3, "gs": 4, "ss": 5, "tr": 6, "ldt": 7}
_CR0, _CR3, _CR4, _EFER = 224, 240, 248, 264
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_PG = 1, 2, 0x10, 0x20, 1 << 31
CR4_PAE = 0x20
EFER_LME, EFER_LMA = 0x100, 0x400


def _x86_long_mode_sregs(sregs: bytearray, pml4: int) -> bytearray:
    def seg(name: str, selector: int, type_: int, db: int, s: int, l: int, g: int,
            limit: int = 0xFFFFFFFF) -> None:
        _SEGMENT.pack_into(sregs, 24 * _SEG[name], 0, limit, selector, type_, 1, 0, db, s, l,
                           g, 0, 0)
    seg("cs", 0x08, 11, 0, 1, 1, 1)  # execute/read, accessed; 64-bit (L)
    for name in ("ds", "es", "fs", "gs", "ss"):
        seg(name, 0x10, 3, 1, 1, 0, 1)  # read/write, accessed
    seg("tr", 0x18, 11, 0, 0, 0, 0, limit=0x67)  # busy 64-bit TSS
    struct.pack_into("<Q", sregs, _CR0, CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG)
    struct.pack_into("<Q", sregs, _CR3, pml4)
    struct.pack_into("<Q", sregs, _CR4, CR4_PAE)
    struct.pack_into("<Q", sregs, _EFER, EFER_LME | EFER_LMA)
    return sregs
