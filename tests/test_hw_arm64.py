"""The arm64 path end to end, under emulation: Debian's arm64 kernel (6.12+)
boots in qemu-system-aarch64 (TCG, virtualization=on, GICv3) with an
initramfs of Debian's arm64 Python and s2split's sources, runs ``python3 -m
s2split.hw run`` with eager splitting on a 64 MiB VM (THP and anonymous), and
sends the JSON results back over the serial console.

This checks correctness only: dirty bitmaps, phases, capability values.
Timings under emulation mean nothing and are never reported or stored.

Needs qemu-system-aarch64 (Debian: qemu-system-arm) and what
tests/hw/arm64/build_image.sh fetches (cached under $S2SPLIT_HW_CACHE or
.hw-cache/)."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from s2split.hw.harness import phase_names
from s2split.hw.params import HwParams
from s2split.hw.selftest import parse_output

from _guest_writes import written_pages

REPO = Path(__file__).resolve().parent.parent
ARM64 = REPO / "tests" / "hw" / "arm64"
MIB = 1 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("S2SPLIT_HW_CACHE", REPO / ".hw-cache")) / "arm64"


def expected_iteration_writes(seeds, pages, write_percent, random_access, iterations):
    """Per iteration: the pages (relative to the test region) the vCPUs write,
    after the sequential populate pass."""
    out = [set() for _ in range(iterations)]
    passes = [(100, False)] + [(write_percent, random_access)] * iterations
    for v, seed in enumerate(seeds):
        for it, written in enumerate(written_pages(seed, pages, passes)[1:]):
            out[it].update(v * pages + page for page in written)
    return out


def bitmap_set(hexstr: str) -> set:
    value = int.from_bytes(bytes.fromhex(hexstr), "little")
    return {i for i in range(value.bit_length()) if value >> i & 1}


#: The ``fidelity record`` runs of the same boot (see test_fidelity_record_under_emulation):
#: manual-protect on THP and 4K pages, and two vCPUs writing the same pages (-o).
RECORD_ARGS = [["-b", "4M", "-s", "anonymous_thp,anonymous", "-k", "2M"],
               ["-v", "2", "-o", "-b", "1M", "-s", "anonymous", "-k", "2M", "-g"]]


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """One boot: ``hw run`` and the ``fidelity record`` runs; the report."""
    tmp_path = tmp_path_factory.mktemp("arm64")
    qemu = shutil.which("qemu-system-aarch64")
    if qemu is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-system-aarch64 is missing: CI must 'apt-get install "
                        "qemu-system-arm'")
        pytest.skip("qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)")
    build = subprocess.run(["bash", str(ARM64 / "build_image.sh")], capture_output=True,
                           text=True, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    cache = cache_dir()

    # The test's initramfs: Debian's (cached) plus /init and s2split's sources.
    overlay = tmp_path / "overlay"
    shutil.copytree(REPO / "src" / "s2split", overlay / "opt" / "s2split" / "s2split",
                    ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc", "*.pyc"))
    shutil.copy(ARM64 / "init.py", overlay / "init")
    (overlay / "init").chmod(0o755)
    subprocess.run([sys.executable, str(ARM64 / "mkcpio.py"), str(tmp_path / "overlay.cpio"),
                    str(overlay)], check=True)
    initrd = tmp_path / "initrd.cpio"
    with open(initrd, "wb") as out:
        for part in (cache / "base.cpio", tmp_path / "overlay.cpio"):
            out.write(part.read_bytes())

    vcpus, per_vcpu, wp = 2, 32 * MIB, 50
    args = ["-v", str(vcpus), "-b", "32M", "-s", "anonymous_thp,anonymous", "--chunk-size",
            "2M", "-w", str(wp), "-a", "--seed-synced", "-r", "3", "--verify",
            "--keep-bitmaps", "--label", "emulated"]
    blob = base64.urlsafe_b64encode(json.dumps(args).encode()).decode()
    records = base64.urlsafe_b64encode(json.dumps(RECORD_ARGS).encode()).decode()
    cmd = [qemu, "-machine", "virt,virtualization=on,gic-version=3",
           "-cpu", "max,pauth-impdef=on", "-smp", "2", "-m", "1024",
           "-accel", "tcg,thread=multi", "-nodefaults", "-display", "none",
           "-serial", "stdio", "-no-reboot", "-kernel", str(cache / "Image"),
           "-initrd", str(initrd),
           "-append", f"console=ttyAMA0 panic=-1 quiet S2SPLIT_ARGS={blob} "
           f"S2SPLIT_RECORD={records}"]
    vm = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    console = vm.stdout + vm.stderr
    m = re.search(r"S2SPLIT-RESULT-BEGIN\s*(.*?)\s*S2SPLIT-RESULT-END", console, re.S)
    assert m, f"no result on the console (qemu exit {vm.returncode}):\n{console[-3000:]}"
    report = json.loads(base64.b64decode("".join(m.group(1).split())))
    assert "init_error" not in report, report
    return report


@pytest.mark.slow
def test_arm64_harness_under_emulation(emulated):
    report = emulated
    vcpus, per_vcpu, wp = 2, 32 * MIB, 50
    assert report["returncode"] == 0, report["stderr"] + report["stdout"]

    # Debian's arm64 kernel, 6.12 or newer, and no numpy anywhere in the guest
    release = re.search(r"Linux version (\d+)\.(\d+)", report["proc_version"])
    assert (int(release.group(1)), int(release.group(2))) >= (6, 12), report["proc_version"]
    assert report["numpy_importable"] is False

    result = report["result"]
    assert result["host"]["arch"] == "aarch64"
    assert result["host"]["page_size"] == 4096
    runs = result["runs"]
    assert [r["config_key"] for r in runs] == [
        f"-m 6 -b 32M -s {b} -v 2 -w 50 -a -r 3 --chunk-size 2M --seed-synced"
        for b in ("anonymous_thp", "anonymous")]
    pages = per_vcpu // 4096
    want = expected_iteration_writes([3 + i for i in range(vcpus)], pages, wp, True, 2)
    for run in runs:
        caps = run["capabilities"]
        assert caps["KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES"] == (1 << 12) | (1 << 21) | (1 << 30)
        assert caps["eager_split_chunk_size_set"] == 2 * MIB  # read back from the VM
        assert caps["KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"] == 3
        assert caps["manual_protect_flags"] == 3
        assert caps["KVM_CAP_ARM_VM_IPA_SIZE"] >= 40
        assert run["problems"] == [], run["problems"]
        assert len(run["checks"]) == 3  # two bitmaps and the memory
        # the bitmaps, checked here from first principles too
        it1, it2 = run["bitmaps"]
        assert bitmap_set(it1["1"]) == set(range(vcpus * pages))  # initially set
        assert bitmap_set(it2["1"]) == want[1]
        assert 0 < len(want[1]) < vcpus * pages
        # the layout is the model's: the top of the 40-bit space
        gpa = run["layout"]["gpa"]
        top = (1 << 40) - vcpus * per_vcpu - 4096
        assert gpa == (top & ~(2 * MIB - 1) if "thp" in run["config_key"] else top)

    # every phase measured (positive), in the upstream order; no timing is judged
    p = HwParams(vcpu_memory_bytes=per_vcpu)
    for key in {r["config_key"] for r in result["rows"]}:
        phases = [r["phase"] for r in result["rows"] if r["config_key"] == key]
        assert phases == phase_names(p)
    assert all(r["seconds"] > 0 for r in result["rows"])
    # and the console output reads back as selftest output
    parsed = parse_output(report["stdout"])
    assert [r.status for r in parsed.runs] == ["ok", "ok"]


@pytest.mark.slow
def test_fidelity_record_under_emulation(emulated, tmp_path):
    """``fidelity record`` on Debian's kernel (kprobe events, hist triggers),
    then ``fidelity`` on the fixtures it wrote: the model matches the real
    kernel -- exactly, and within the derived bounds where two vCPUs write the
    same pages -- and the recorder left nothing behind in tracefs."""
    from s2split.tasks.fidelity import check_fixture
    from s2split.hw.record import PROBES

    records = emulated["records"]
    assert [r["argv"] for r in records] == RECORD_ARGS
    assert emulated["kprobe_events_after"].strip() == ""
    assert emulated["instances_after"] == []
    checks = []
    for i, rec in enumerate(records):
        assert rec["returncode"] == 0, rec["stderr"] + rec["stdout"]
        fixture = rec["fixture"]
        assert fixture["kernel_release"] in emulated["proc_version"]
        assert fixture["selftest_variant"] == "s2split-hw"
        # every probe is either traced or recorded missing, with a reason
        assert set(fixture["traced_functions"]) | set(fixture["missing_functions"]) == \
            {p.function for p in PROBES}
        assert {"kvm_pgtable_walk", "__kvm_pgtable_walk", "stage2_split_walker",
                "stage2_attr_walker", "kvm_pgtable_stage2_split",
                "kvm_pgtable_stage2_relax_perms", "__kvm_tlb_flush_vmid_ipa_nsh"} <= \
            set(fixture["traced_functions"])
        path = tmp_path / f"recorded{i}.json"
        path.write_text(json.dumps(fixture))
        checks.append(check_fixture(str(path), engine="reference"))
    thp, anon = checks[0]
    overlap, = checks[1]
    for chk in (thp, anon, overlap):
        assert chk.layout_ok, chk.layout_note
        assert chk.compared_exact > 50
        assert chk.mismatches == [], [(r.phase, r.function, r.key, r.field, r.kernel, r.lo,
                                       r.hi) for r in chk.mismatches]
    # the split work was really recorded: THP blocks split when the log is cleared
    split = [r for r in thp.rows if r.phase == "iter1_clear_dirty_log" and
             r.function == "stage2_split_walker" and r.field == "calls"]
    assert split and split[0].kernel > 0 and split[0].kernel == split[0].model
    # -o with two vCPUs: the dirtying passes' fault path is compared as bounds
    # (2 x 1M over one 2M region: 512 pages, each written twice per pass, so
    # [512, 1024] relax_perms calls), everything else exactly
    for it in (1, 2):
        r = next(r for r in overlap.rows if (r.phase, r.function, r.field) ==
                 (f"iter{it}_dirty", "kvm_pgtable_stage2_relax_perms", "calls"))
        assert (r.lo, r.hi) == (512, 1024) and r.lo <= r.kernel <= r.hi
    assert not any(r.bound for r in overlap.rows if "get_dirty_log" in r.phase)
