"""The KVM harness on this machine's real /dev/kvm (x86-64 here, arm64 on an
arm64 host): dirty bitmaps, manual-protect semantics, capabilities, phases.

These tests skip only where /dev/kvm is absent."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from s2split.plumbing.errors import S2Error
from s2split.hw import guest as G
from s2split.hw.harness import phase_names, run_config
from s2split.arm64.uapi import KVM_MEM_LOG_DIRTY_PAGES
from s2split.hw.kvm import (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, Kvm,
                            KvmError, bitmap_pages, host_arch)
from s2split.hw.machine import CODE_GPA, Machine
from s2split.hw.params import HwParams, memstress_layout
from s2split.hw.selftest import import_rows, parse_output
from s2split.selftest.modes import parse_mode

from _guest_writes import written_pages

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"),
                                reason="/dev/kvm is absent: no KVM on this machine")

MIB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


# -- a small VM built directly on the driver ---------------------------------------------
class SmallVm:
    """One vCPU writing over one memslot of ``pages`` 4K pages at the top of a
    40-bit space (the memstress layout)."""

    def __init__(self, pages=1024, seed=7, manual_flags=None, backing="anonymous"):
        self.kvm = Kvm()
        self.m = Machine(self.kvm, 40, 4096)
        p = HwParams(vcpu_memory_bytes=pages * 4096, backing=backing)
        lay = memstress_layout(p, 4096 if backing == "anonymous" else 2 * MIB)
        self.m.add_system_memory()
        self.slot, self.gpa, _ = lay.slots[0]
        self.m.add_test_memory(self.slot, self.gpa, pages * 4096, backing)
        if manual_flags is not None:
            self.m.vm.enable_manual_protect(manual_flags)
        self.m.add_vcpu(self.gpa, pages, seed)
        self.pages = pages
        self.passes = 0

    def guest_pass(self, write_percent=100, random_access=False):
        self.m.set_control(write_percent, random_access, G.VALUE_TAG | self.passes)
        self.m.run_pass()
        self.passes += 1

    def get(self):
        return set(bitmap_pages(self.m.vm.get_dirty_log(self.slot), self.pages))

    def clear(self, pages):
        bm = self.m.vm.new_bitmap(self.slot)
        raw = bytearray(len(bm))
        for p in pages:
            raw[p // 8] |= 1 << (p % 8)
        bm.raw = bytes(raw)
        self.m.vm.clear_dirty_log(self.slot, bm, 0, self.pages)

    def close(self):
        self.m.close()
        self.kvm.close()


@pytest.fixture
def small_vm():
    vms = []

    def make(**kw):
        vm = SmallVm(**kw)
        vms.append(vm)
        return vm
    yield make
    for vm in vms:
        vm.close()


def test_dirty_bitmap_is_exactly_the_pages_the_guest_wrote(small_vm):
    vm = small_vm(pages=1024, seed=7, manual_flags=None)
    vm.guest_pass(100)  # populate (not logged)
    vm.m.vm.set_memslot_flags(vm.slot, KVM_MEM_LOG_DIRTY_PAGES)
    vm.guest_pass(37, random_access=False)
    vm.guest_pass(61, random_access=True)
    # the pages written by the two logged passes, from the generator
    _, first, second = written_pages(7, 1024, [(100, False), (37, False), (61, True)])
    assert vm.get() == first | second
    assert 0 < len(first | second) < 1024
    # and the memory holds the value of the last pass that wrote each page
    mem = vm.m.vm.memslots[vm.slot].memory
    for page in range(1024):
        last = 2 if page in second else 1 if page in first else 0
        assert mem.read_u64(page * 4096) == G.VALUE_TAG | last


def test_manual_protect_initially_set_round_trips(small_vm):
    vm = small_vm(pages=512, seed=3,
                  manual_flags=KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | 2)  # | INITIALLY_SET
    vm.guest_pass(100)
    vm.m.vm.set_memslot_flags(vm.slot, KVM_MEM_LOG_DIRTY_PAGES)
    everything = set(range(512))
    assert vm.get() == everything  # initially set: all ones before any clear
    assert vm.get() == everything  # GET does not clear with manual protect
    vm.clear(everything)
    assert vm.get() == set()  # cleared, and nothing written since
    _, written = written_pages(3, 512, [(100, False), (40, False)])
    vm.guest_pass(40)
    assert vm.get() == written  # only pages written since the clear
    half = set(sorted(written)[: len(written) // 2])
    vm.clear(half)
    assert vm.get() == written - half  # bits not cleared stay set
    vm.clear(everything)
    assert vm.get() == set()


def test_manual_protect_without_initially_set_starts_clean(small_vm):
    vm = small_vm(pages=256, seed=11, manual_flags=KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    vm.guest_pass(100)
    vm.m.vm.set_memslot_flags(vm.slot, KVM_MEM_LOG_DIRTY_PAGES)
    assert vm.get() == set()
    _, written = written_pages(11, 256, [(100, False), (50, True)])
    vm.guest_pass(50, random_access=True)
    assert vm.get() == written
    assert vm.get() == written  # still set: only CLEAR re-protects


def test_without_manual_protect_get_clears_the_log(small_vm):
    vm = small_vm(pages=512, seed=5, manual_flags=None)
    vm.guest_pass(100)
    vm.m.vm.set_memslot_flags(vm.slot, KVM_MEM_LOG_DIRTY_PAGES)
    assert vm.get() == set()  # no initially-set without manual protect
    _, w1, w2 = written_pages(5, 512, [(100, False), (30, False), (30, False)])
    vm.guest_pass(30)
    assert vm.get() == w1
    assert vm.get() == set()  # the first GET cleared (and re-protected) everything
    vm.guest_pass(30)
    assert vm.get() == w2  # writes after the GET fault again and are logged again


def test_disabling_dirty_logging_stops_logging(small_vm):
    vm = small_vm(pages=256, seed=1, manual_flags=None)
    vm.guest_pass(100)
    vm.m.vm.set_memslot_flags(vm.slot, KVM_MEM_LOG_DIRTY_PAGES)
    vm.guest_pass(100)
    assert vm.get() == set(range(256))
    vm.m.vm.set_memslot_flags(vm.slot, 0)
    vm.guest_pass(100)
    with pytest.raises(KvmError, match="KVM_GET_DIRTY_LOG failed for slot 1 .*ENOENT"):
        vm.m.vm.get_dirty_log(vm.slot)  # no dirty bitmap on a slot without logging


# A branch to itself, in place of the guest program: the pass never reaches
# the doorbell. x86-64 "jmp $" (EB FE); AArch64 "b ." (0x14000000).
SPIN = {"x86_64": bytes([0xEB, 0xFE]), "arm64": (0x14000000).to_bytes(4, "little")}


def test_watchdog_stops_a_hung_guest():
    before = signal.getsignal(signal.SIGUSR1)
    kvm = Kvm()
    try:
        with Machine(kvm, 40, 4096, pass_timeout=0.2) as m:
            m.add_system_memory()
            m.system.memory.write(CODE_GPA, SPIN[m.arch])
            m.add_vcpu(0, 1, 1)
            m.add_vcpu(0, 1, 2)
            with pytest.raises(KvmError, match=r"vCPU 0 did not finish its pass within 0\.2 s"):
                m.run_pass()
            # Both threads were stopped and wait for the next pass, which
            # the watchdog ends the same way.
            assert all(t.is_alive() for t in m._threads)
            with pytest.raises(KvmError, match="did not finish its pass"):
                m.run_pass()
    finally:
        kvm.close()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_default_pass_timeout_grows_with_the_largest_vcpu_region():
    from s2split.hw.harness import default_pass_timeout
    # -v 2 -b 256M, 4K pages: 65,536 pages per vCPU: 600 s + 65,536 x 20 us.
    lay = memstress_layout(HwParams(vcpu_memory_bytes=256 * MIB, vcpus=2), 4096)
    assert default_pass_timeout(lay) == pytest.approx(601.31072)


def test_an_enormous_pass_timeout_is_no_limit(tmp_path):
    # beyond threading.TIMEOUT_MAX: clamped, not an OverflowError
    proc = run_cli("run", "-b", "2M", "--pass-timeout", "1e300", "--json",
                   str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr


def test_backing_names_follow_the_host_page_size(monkeypatch):
    # hugetlb sizes are the host kernel's: a 64K guest mode on a 4K host may
    # use 32M (contiguous PMDs of 4K pages) but not 512M (a 64K-page PMD).
    from s2split.hw import harness
    monkeypatch.setattr(harness, "host_page_size", lambda: 4096)
    harness.check_backing_name(HwParams(mode=parse_mode(8), backing="anonymous_hugetlb_32mb"))
    with pytest.raises(S2Error, match="512"):
        harness.check_backing_name(HwParams(mode=parse_mode(8),
                                            backing="anonymous_hugetlb_512mb"))


# -- the harness ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(),
    dict(write_percent=45, random_access=True, seed=9, seed_synced=True, vcpus=2),
    dict(manual_protect=False, write_percent=30, vcpus=3, slots=3, iterations=3),
    dict(backing="anonymous_thp", partition=False, vcpus=2, write_percent=60),
    dict(slots=2, write_percent=0),
])
def test_harness_verifies_every_bitmap(kw):
    p = HwParams(vcpu_memory_bytes=8 * MIB, **kw)
    lines = []
    r = run_config(p, lines.append, verify=True)
    assert r.problems == []
    assert len(r.checks) == p.iterations * p.slots + 1
    # every phase measured, in the upstream order, each time positive
    assert [ph for ph, _ in r.phases] == phase_names(p)
    assert all(ns > 0 for _, ns in r.phases)


def test_harness_bitmap_matches_the_model():
    """The last GET on real KVM equals the model's last GET, bit for bit."""
    from s2split.model.pgtable.variants import VANILLA
    from s2split.workload import PerfTestParams, run_perf_test

    kw = dict(vcpu_memory_bytes=4 * MIB, vcpus=2, write_percent=35, random_access=True,
              seed=21, seed_synced=True, iterations=3)
    r = run_config(HwParams(**kw), lambda s: None, keep_bitmaps=True)
    model = run_perf_test(PerfTestParams(**kw), VANILLA)
    words = model.bitmaps[1]
    model_pages = {w * 64 + b for w, word in enumerate(words) for b in range(64)
                   if word >> b & 1}
    assert set(r.bitmaps[-1][1]) == model_pages
    assert 0 < len(model_pages) < 2048


def test_harness_places_memory_like_the_model():
    from s2split.workload import PerfTestParams
    from s2split.workload import memstress_layout as model_layout

    lines = []
    p = HwParams(vcpu_memory_bytes=8 * MIB, backing="anonymous_thp", vcpus=2)
    r = run_config(p, lines.append)
    lay = model_layout(PerfTestParams(vcpu_memory_bytes=8 * MIB, backing="anonymous_thp",
                                      vcpus=2))
    assert (r.layout.gpa, r.layout.size, r.layout.slots) == (lay.gpa, lay.size, lay.slots)
    assert f"guest physical test memory: [{lay.gpa:#x}, {lay.gpa + lay.size:#x})" in lines


def test_output_reads_back_as_selftest_output():
    lines = []
    p = HwParams(vcpu_memory_bytes=4 * MIB, iterations=3)
    r = run_config(p, lines.append)
    parsed = parse_output("Test iterations: 3\n" + "\n".join(lines))
    assert [run.status for run in parsed.runs] == ["ok"]
    rows, _ = import_rows(parsed, "x")
    assert [(row["phase"], round(row["seconds"] * 1e9)) for row in rows] == r.phases
    assert rows[0]["config_key"] == p.config_key()


@pytest.mark.skipif(host_arch() != "x86_64", reason="x86-64 host only")
def test_eager_split_is_unsupported_on_x86_with_a_clear_message():
    with pytest.raises(KvmError) as e:
        run_config(HwParams(vcpu_memory_bytes=2 * MIB, chunk_size=2 * MIB), lambda s: None)
    msg = str(e.value)
    assert "KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE is not supported" in msg
    assert "x86-64" in msg and "\n" not in msg
    with Kvm() as kvm:
        from s2split.hw.kvm import Vm
        with Vm(kvm) as vm:
            assert vm.supported_block_sizes() == 0


@pytest.mark.skipif(host_arch() != "x86_64", reason="x86-64 host only")
def test_x86_rejects_what_it_cannot_map():
    with pytest.raises(S2Error, match="at most 47 bits"):
        run_config(HwParams(vcpu_memory_bytes=2 * MIB, mode=parse_mode(3)), lambda s: None)
    with pytest.raises(S2Error, match="4K pages"):
        run_config(HwParams(vcpu_memory_bytes=2 * MIB, mode=parse_mode(8)), lambda s: None)


def test_hugetlb_without_a_pool_is_a_clear_error():
    # 1G hugepages: the other hugetlb test only borrows 2M ones
    pool = Path("/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages")
    if pool.exists() and int(pool.read_text()):
        pytest.skip("this host has free 1G hugepages")
    with pytest.raises(S2Error) as e:
        run_config(HwParams(vcpu_memory_bytes=1 << 30, backing="anonymous_hugetlb_1gb"),
                   lambda s: None)
    msg = str(e.value)
    assert "1048576 kB hugepages" in msg and "\n" not in msg
    assert ("nr_hugepages" in msg) == pool.exists()


def test_hugetlb_backing_with_a_temporary_pool():
    nr = Path("/proc/sys/vm/nr_hugepages")
    try:
        before = int(nr.read_text())
        nr.write_text(str(before + 4))
    except OSError:
        pytest.skip("cannot reserve hugepages here (not root)")
    try:
        if int(nr.read_text()) < before + 4:
            pytest.skip("the kernel could not reserve 4 more hugepages")
        r = run_config(HwParams(vcpu_memory_bytes=4 * MIB, backing="anonymous_hugetlb",
                                write_percent=50, random_access=True, seed=4, seed_synced=True),
                       lambda s: None, verify=True)
        assert r.problems == [] and r.layout.gpa % (2 * MIB) == 0
    finally:
        nr.write_text(str(before))


# -- the command line ------------------------------------------------------------------------------
def run_cli(*argv, numpy_blocked=False, cwd=None):
    code = "import sys\n"
    if numpy_blocked:
        code += "sys.modules['numpy'] = None  # any 'import numpy' now fails\n"
    code += "import runpy\nsys.argv = ['s2split'] + sys.argv[1:]\n" \
            "runpy.run_module('s2split.hw', run_name='__main__')\n"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_hw_run_needs_no_numpy(tmp_path):
    out = tmp_path / "r.json"
    proc = run_cli("run", "-b", "4M", "-v", "2", "-s", "anonymous,anonymous_thp", "--repeat",
                   "2", "--json", str(out), "--verify", "--label", "k1", numpy_blocked=True)
    assert proc.returncode == 0, proc.stderr
    assert "Populate memory time: " in proc.stdout
    doc = json.loads(out.read_text())
    keys = [r["config_key"] for r in doc["runs"]]
    # two configurations, twice, interleaved (and rotated in the second round)
    assert keys == ["-m 6 -b 4M -s anonymous -v 2", "-m 6 -b 4M -s anonymous_thp -v 2",
                    "-m 6 -b 4M -s anonymous_thp -v 2", "-m 6 -b 4M -s anonymous -v 2"]
    assert all(r["problems"] == [] for r in doc["runs"])
    assert all(row["seconds"] > 0 and row["label"] == "k1" for row in doc["rows"])
    host = doc["host"]
    for k in ("kernel_release", "kernel_cmdline", "cpu", "page_size", "thp", "hugetlb",
              "kvm_capabilities"):
        assert k in host
    assert host["kvm_capabilities"]["KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"] == 3


def test_hw_run_into_the_store_then_import_json(tmp_path):
    from s2split.storage.store import Store
    db = tmp_path / "r.sqlite"
    proc = run_cli("run", "-b", "2M", "-g", "--db", str(db), "--label", "k2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("run", "-b", "2M", "-g", "--json", str(tmp_path / "x.json"), "--label", "k3")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("import-json", str(tmp_path / "x.json"), "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    store = Store.open(db)
    assert store.labels() == ["k2", "k3"]
    rows = store.measurements("k2")
    assert {r["phase"] for r in rows} == set(phase_names(HwParams(manual_protect=False)))
    assert all(r["seconds"] > 0 and r["config_key"] == "-m 6 -b 2M -s anonymous -g"
               for r in rows)
    assert rows[0]["host"]["kernel_release"] == os.uname().release
    store.close()


@pytest.mark.parametrize("argv,needle", [
    (["run", "-b", "2M", "--kvm", "/nonexistent/kvm"], "/nonexistent/kvm does not exist"),
    (["run", "-b", "2M", "--chunk-size", "2M", "--json", "/dev/null"] if host_arch() ==
     "x86_64" else ["run", "-b", "2M", "--chunk-size", "3M", "--json", "/dev/null"],
     "KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE" if host_arch() == "x86_64" else "not 0 or a"),
    (["run", "-b", "3M", "-x", "2", "-s", "anonymous_hugetlb"], "not aligned"),
    (["run", "-s", "nosuch"], "unknown backing src type"),
    (["run", "-w", "101"], "must be <= 100"),
    (["run", "--pass-timeout", "soon"], "--pass-timeout 'soon' is not a number"),
    (["run", "--pass-timeout", "nan"], "must be a finite number >= 0"),
    (["run", "--pass-timeout=-1s"], "must be a finite number >= 0"),
    (["import-json", "/nonexistent.json"], "cannot read"),
])
def test_bad_input_is_one_line_exit_2(argv, needle):
    proc = run_cli(*argv)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
