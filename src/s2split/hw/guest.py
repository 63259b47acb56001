"""The guest program: one word per page over a region, then an MMIO exit.

The same loop for both architectures, as machine code assembled here from a
few dozen hand-encoded instructions (no assembler needed). It is
``memstress_guest_code`` of the selftests without the ucall machinery::

    state = seed                              # per vCPU: (seed if synced else 0) + index
    forever:
        write_percent, random_access, value = ctl[0], ctl[8], ctl[16]
        for i in 0 .. pages-1:
            page = i
            if random_access:
                state = state * 48271 % (2**31 - 1)      # Park-Miller
                page = state % pages
            state = state * 48271 % (2**31 - 1)
            if state % 100 < write_percent: *(u64 *)(base + page * page_size) = value
            else:                           read *(u64 *)(base + page * page_size)
        *(u64 *)mmio = pages                  # not in any memslot: KVM_EXIT_MMIO

The control block ``ctl`` (three 64-bit words in memslot 0) is rewritten by
the host while the vCPUs are stopped between passes; ``value`` is the pass
number (plus :data:`VALUE_TAG`), so the host can also read back which pass
last wrote each page.

Register contract (set by the host before the first ``KVM_RUN``):

========== ======= ====== ==============================================
input      AArch64 x86-64 meaning
========== ======= ====== ==============================================
base       x0      rdi    first byte of this vCPU's region (guest VA)
pages      x1      rsi    number of guest pages in the region
page_size  x2      r13    guest page size
state      x3      rcx    Park-Miller state (the seed)
ctl        x4      r8     address of the control block
mmio       x5      r9     address of the MMIO doorbell
========== ======= ====== ==============================================

AArch64 runs at EL1 with the MMU off (VA = IPA; data accesses are Device
memory, which is fine for aligned 64-bit loads and stores); x86-64 runs in
64-bit long mode on identity page tables built by :mod:`s2split.hw.machine`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..selftest.memstress import PRNG_MODULUS, PRNG_MULTIPLIER, guest_random_u32

VALUE_TAG = 0x5332_0000_0000_0000  # "S2": written values are VALUE_TAG | pass
CTL_WRITE_PERCENT = 0
CTL_RANDOM_ACCESS = 8
CTL_VALUE = 16


#: The host's replay of the guest's generator (the same as the model's).
next_state = guest_random_u32


# -- a tiny two-pass assembler: words/bytes with label fix-ups ------------------------------
@dataclass
class _Fix:
    label: str
    kind: str


class _Program:
    def __init__(self) -> None:
        self.items: list[object] = []
        self.labels: dict[str, int] = {}
        self.size = 0

    def label(self, name: str) -> None:
        self.labels[name] = self.size


# -- AArch64 -----------------------------------------------------------------------------
# Encodings (ARM ARM, A64 base instructions; X registers, sf = 1):
#   MOVZ Xd, #imm16, LSL #(16*hw)   1 10 100101 hw imm16 Rd      0xD2800000
#   MOVK Xd, #imm16, LSL #(16*hw)   1 11 100101 hw imm16 Rd      0xF2800000
#   ORR  Xd, XZR, Xm  (MOV)         1 01 01010 00 0 Rm 0 11111 Rd 0xAA0003E0
#   ADD  Xd, Xn, #imm12             1 0 0 100010 0 imm12 Rn Rd   0x91000000
#   MADD Xd, Xn, Xm, Xa             1 00 11011 000 Rm 0 Ra Rn Rd 0x9B000000
#   MSUB Xd, Xn, Xm, Xa             1 00 11011 000 Rm 1 Ra Rn Rd 0x9B008000
#   UDIV Xd, Xn, Xm                 1 0 0 11010110 Rm 00001 0 Rn Rd 0x9AC00800
#   SUBS XZR, Xn, Xm  (CMP)         1 1 1 01011 00 0 Rm 0 Rn 11111 0xEB00001F
#   LDR  Xt, [Xn, #imm12*8]         11 111 0 01 01 imm12 Rn Rt   0xF9400000
#   STR  Xt, [Xn, #imm12*8]         11 111 0 01 00 imm12 Rn Rt   0xF9000000
#   B.cond label                    0101010 0 imm19 0 cond       0x54000000
#   CBZ  Xt, label                  1 011010 0 imm19 Rt          0xB4000000
#   B    label                      0 00101 imm26                0x14000000
# Branch offsets count 4-byte instructions from the branch itself.
XZR = 31
COND = {"eq": 0, "ne": 1, "hs": 2, "lo": 3}


class A64(_Program):
    def _w(self, word: int) -> None:
        self.items.append(word & 0xFFFFFFFF)
        self.size += 4

    def movz(self, rd: int, imm: int, hw: int = 0) -> None:
        self._w(0xD2800000 | hw << 21 | (imm & 0xFFFF) << 5 | rd)

    def movk(self, rd: int, imm: int, hw: int) -> None:
        self._w(0xF2800000 | hw << 21 | (imm & 0xFFFF) << 5 | rd)

    def mov_imm(self, rd: int, value: int) -> None:
        self.movz(rd, value & 0xFFFF)
        for hw in range(1, 4):
            part = value >> (16 * hw) & 0xFFFF
            if part:
                self.movk(rd, part, hw)

    def mov(self, rd: int, rm: int) -> None:
        self._w(0xAA0003E0 | rm << 16 | rd)

    def add_imm(self, rd: int, rn: int, imm: int) -> None:
        assert 0 <= imm < 4096
        self._w(0x91000000 | imm << 10 | rn << 5 | rd)

    def madd(self, rd: int, rn: int, rm: int, ra: int) -> None:
        self._w(0x9B000000 | rm << 16 | ra << 10 | rn << 5 | rd)

    def mul(self, rd: int, rn: int, rm: int) -> None:
        self.madd(rd, rn, rm, XZR)

    def msub(self, rd: int, rn: int, rm: int, ra: int) -> None:
        self._w(0x9B008000 | rm << 16 | ra << 10 | rn << 5 | rd)

    def udiv(self, rd: int, rn: int, rm: int) -> None:
        self._w(0x9AC00800 | rm << 16 | rn << 5 | rd)

    def cmp(self, rn: int, rm: int) -> None:
        self._w(0xEB00001F | rm << 16 | rn << 5)

    def ldr(self, rt: int, rn: int, offset: int = 0) -> None:
        assert offset % 8 == 0 and 0 <= offset < 8 * 4096
        self._w(0xF9400000 | (offset // 8) << 10 | rn << 5 | rt)

    def str_(self, rt: int, rn: int, offset: int = 0) -> None:
        assert offset % 8 == 0 and 0 <= offset < 8 * 4096
        self._w(0xF9000000 | (offset // 8) << 10 | rn << 5 | rt)

    def b_cond(self, cond: str, label: str) -> None:
        self.items.append((_Fix(label, "b.cond"), 0x54000000 | COND[cond]))
        self.size += 4

    def cbz(self, rt: int, label: str) -> None:
        self.items.append((_Fix(label, "cbz"), 0xB4000000 | rt))
        self.size += 4

    def b(self, label: str) -> None:
        self.items.append((_Fix(label, "b"), 0x14000000))
        self.size += 4

    def assemble(self) -> bytes:
        out = bytearray()
        for item in self.items:
            if isinstance(item, tuple):
                fix, word = item
                delta = (self.labels[fix.label] - len(out)) // 4
                if fix.kind == "b":
                    word |= delta & 0x3FFFFFF
                else:
                    word |= (delta & 0x7FFFF) << 5
                item = word
            out += int(item).to_bytes(4, "little")
        return bytes(out)


def arm64_program() -> bytes:
    """The guest loop as AArch64 machine code (see the module docstring)."""
    a = A64()
    base, pages, psize, state, ctl, mmio = 0, 1, 2, 3, 4, 5
    mult, mod, hundred = 6, 7, 8
    wp, rand, i, page, t, q, r, addr, value = 9, 10, 11, 12, 13, 14, 15, 16, 17
    a.mov_imm(mult, PRNG_MULTIPLIER)
    a.mov_imm(mod, PRNG_MODULUS)
    a.mov_imm(hundred, 100)
    a.label("pass")
    a.ldr(wp, ctl, CTL_WRITE_PERCENT)
    a.ldr(rand, ctl, CTL_RANDOM_ACCESS)
    a.ldr(value, ctl, CTL_VALUE)
    a.movz(i, 0)
    a.cbz(pages, "done")
    a.label("loop")
    a.mov(page, i)
    a.cbz(rand, "decide")
    a.mul(t, state, mult)            # state = state * 48271 % (2^31 - 1)
    a.udiv(q, t, mod)
    a.msub(state, q, mod, t)
    a.udiv(q, state, pages)          # page = state % pages
    a.msub(page, q, pages, state)
    a.label("decide")
    a.mul(t, state, mult)            # state = state * 48271 % (2^31 - 1)
    a.udiv(q, t, mod)
    a.msub(state, q, mod, t)
    a.udiv(q, state, hundred)        # r = state % 100
    a.msub(r, q, hundred, state)
    a.madd(addr, page, psize, base)  # addr = base + page * page_size
    a.cmp(r, wp)
    a.b_cond("hs", "read")
    a.str_(value, addr)
    a.b("next")
    a.label("read")
    a.ldr(t, addr)
    a.label("next")
    a.add_imm(i, i, 1)
    a.cmp(i, pages)
    a.b_cond("lo", "loop")
    a.label("done")
    a.str_(i, mmio)                  # the MMIO exit
    a.b("pass")
    return a.assemble()


# -- x86-64 --------------------------------------------------------------------------------
# Hand-encoded (Intel SDM vol. 2). REX = 0100WRXB: W = 64-bit operand, R extends
# ModRM.reg, B extends ModRM.rm. ModRM = mod(2) reg(3) rm(3); mod 11 = register,
# 00 = [rm], 01 = [rm + disp8]. Register numbers: rax 0, rcx 1, rdx 2, rbx 3,
# rsp 4, rbp 5, rsi 6, rdi 7, r8..r15 = 8..15. Jumps are rel8 from the next
# instruction.
X86_CODE: list[tuple[str, bytes | tuple[int, str]]] = [
    ("mov ebx, 48271", b"\xbb" + PRNG_MULTIPLIER.to_bytes(4, "little")),   # B8+rd id
    ("mov r14d, 0x7fffffff", b"\x41\xbe" + PRNG_MODULUS.to_bytes(4, "little")),
    ("mov r15d, 100", b"\x41\xbf" + (100).to_bytes(4, "little")),
    ("pass:", b""),
    ("mov r10, [r8]", b"\x4d\x8b\x10"),            # 8B /r, ModRM 00 010 000
    ("mov r12, [r8+16]", b"\x4d\x8b\x60\x10"),     # ModRM 01 100 000, disp8
    ("xor ebp, ebp", b"\x31\xed"),                 # i = 0
    ("test rsi, rsi", b"\x48\x85\xf6"),
    ("je done", (0x74, "done")),
    ("loop:", b""),
    ("mov r11, rbp", b"\x49\x89\xeb"),             # page = i
    ("cmp qword [r8+8], 0", b"\x49\x83\x78\x08\x00"),  # 83 /7 ib
    ("je decide", (0x74, "decide")),
    ("mov rax, rcx", b"\x48\x89\xc8"),             # state = state * 48271 % (2^31 - 1)
    ("mul rbx", b"\x48\xf7\xe3"),                  # F7 /4: rdx:rax = rax * rbx
    ("div r14", b"\x49\xf7\xf6"),                  # F7 /6: rdx = rdx:rax % r14
    ("mov rcx, rdx", b"\x48\x89\xd1"),
    ("mov rax, rcx", b"\x48\x89\xc8"),             # page = state % pages
    ("xor edx, edx", b"\x31\xd2"),
    ("div rsi", b"\x48\xf7\xf6"),
    ("mov r11, rdx", b"\x49\x89\xd3"),
    ("decide:", b""),
    ("mov rax, rcx", b"\x48\x89\xc8"),             # state = state * 48271 % (2^31 - 1)
    ("mul rbx", b"\x48\xf7\xe3"),
    ("div r14", b"\x49\xf7\xf6"),
    ("mov rcx, rdx", b"\x48\x89\xd1"),
    ("mov rax, rcx", b"\x48\x89\xc8"),             # rdx = state % 100
    ("xor edx, edx", b"\x31\xd2"),
    ("div r15", b"\x49\xf7\xf7"),
    ("mov rax, r11", b"\x4c\x89\xd8"),             # rax = base + page * page_size
    ("imul rax, r13", b"\x49\x0f\xaf\xc5"),        # 0F AF /r
    ("add rax, rdi", b"\x48\x01\xf8"),
    ("cmp rdx, r10", b"\x4c\x39\xd2"),             # state % 100 >= write_percent: read
    ("jae read", (0x73, "read")),
    ("mov [rax], r12", b"\x4c\x89\x20"),
    ("jmp next", (0xEB, "next")),
    ("read:", b""),
    ("mov rdx, [rax]", b"\x48\x8b\x10"),
    ("next:", b""),
    ("inc rbp", b"\x48\xff\xc5"),                  # FF /0
    ("cmp rbp, rsi", b"\x48\x39\xf5"),
    ("jb loop", (0x72, "loop")),
    ("done:", b""),
    ("mov [r9], rbp", b"\x49\x89\x29"),            # the MMIO exit
    ("jmp pass", (0xEB, "pass")),
]


def x86_program() -> bytes:
    """The guest loop as x86-64 machine code (see the module docstring)."""
    labels: dict[str, int] = {}
    pos = 0
    for text, code in X86_CODE:
        if text.endswith(":"):
            labels[text[:-1]] = pos
        else:
            pos += len(code) if isinstance(code, bytes) else 2
    out = bytearray()
    for text, code in X86_CODE:
        if isinstance(code, bytes):
            out += code
        else:
            opcode, label = code
            rel = labels[label] - (len(out) + 2)
            if not -128 <= rel <= 127:
                raise AssertionError(f"x86 guest: jump to {label} out of rel8 range")
            out += bytes((opcode, rel & 0xFF))
    return bytes(out)


# -- the access pattern, computed on the host ---------------------------------------------
def guest_pass(state: int, pages: int, write_percent: int,
               random_access: bool) -> tuple[int, list[int], list[int]]:
    """One pass of the guest loop: (new state, pages written, pages read), in
    access order (random access may repeat pages)."""
    written: list[int] = []
    read: list[int] = []
    for i in range(pages):
        page = i
        if random_access:
            state = next_state(state)
            page = state % pages
        state = next_state(state)
        (written if state % 100 < write_percent else read).append(page)
    return state, written, read
