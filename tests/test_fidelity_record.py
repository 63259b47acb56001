"""``s2split fidelity record``'s tracefs logic against a simulated tracefs (the
real one is exercised end to end in tests/test_hw_arm64.py under emulation):
what it installs, how it reads hist files, per-phase differences, missing
functions, and that everything is removed again on success, on an error, on
Ctrl-C and on SIGTERM; and the hosts that cannot record."""

import errno
import json
import os
import signal

import pytest

from s2split.cli.parser import main
from s2split.hw import record as R


class FakeTracefs(R.Tracefs):
    """The kernel's side of the files the recorder touches, as it behaves:
    kprobe definitions (refused for ``absent`` functions, with an error_log
    entry; busy while enabled or triggered), instances, triggers (removed by
    '!' + the same text), enable switches, hist files that print ``counts``
    (function -> {key tuple: (hitcount, {val: sum})}) in the kernel's format,
    and kprobe_profile."""

    def __init__(self, absent=(), refuse_trigger=(), files=None, refuse_btf=False):
        super().__init__("/nonexistent")
        self.files = dict(files or {})  # e.g. available_filter_functions, README
        self.refuse_btf = refuse_btf  # a kernel whose BTF lacks the argument names
        self.absent = set(absent)
        self.refuse_trigger = set(refuse_trigger)
        self.kprobes = {}  # "grp/fn" -> definition
        self.instances = {}  # name -> {"tracing_on": str}
        self.triggers = {}  # (instance, "grp/fn") -> [text]
        self.enabled = set()  # (instance, "grp/fn")
        self.counts = {}
        self.log = []

    def _err(self, code):
        raise OSError(code, os.strerror(code))

    def read(self, rel):
        if rel in ("available_filter_functions", "README"):
            if rel not in self.files:
                self._err(errno.ENOENT)
            return self.files[rel]
        if rel == "error_log":
            return "\n".join(self.log) + "\n"
        if rel == "kprobe_profile":
            return "".join(f"  {ev.split('/')[1]:<44} {sum(h for h, _ in self.counts.get(ev.split('/')[1], {}).values()):>15} {0:>15}\n"
                           for ev in self.kprobes)
        if rel.endswith("/hist"):
            inst, ev = self._event(rel)
            fn = ev.split("/")[1]
            lines = ["# event histogram", "#", f"# trigger info: {self.triggers[(inst, ev)][0]}",
                     "#", ""]
            for key, (hits, vals) in self.counts.get(fn, {}).items():
                keytext = ", ".join(f"{n}: {v:>10}" if n != "cb" else
                                    f"{n}: [ffff800080123450] {v:<40}" for n, v in key)
                valtext = "  ".join(f"{n}: {v:>10}" for n, v in vals.items())
                lines.append(f"{{ {keytext} }} hitcount: {hits:>10}  {valtext}".rstrip())
            lines += ["", "Totals:", f"    Hits: {sum(h for h, _ in self.counts.get(fn, {}).values())}",
                      f"    Entries: {len(self.counts.get(fn, {}))}", "    Dropped: 0"]
            return "\n".join(lines) + "\n"
        raise AssertionError(f"unexpected read {rel}")

    def _event(self, rel):
        parts = rel.split("/")
        assert parts[0] == "instances" and parts[2] == "events", rel
        inst, ev = parts[1], f"{parts[3]}/{parts[4]}"
        if inst not in self.instances or ev not in self.kprobes:
            self._err(errno.ENOENT)
        return inst, ev

    def write(self, rel, text, append=False):
        if rel == "kprobe_events":
            assert append, "writing kprobe_events without O_APPEND clears every probe"
            if text.startswith("-:"):
                ev = text[2:]
                if any(e == ev for _, e in self.enabled) or any(
                        e == ev and t for (_, e), t in self.triggers.items()):
                    self._err(errno.EBUSY)
                del self.kprobes[ev]
                return
            head, fn = text.split()[0], text.split()[1]
            if self.refuse_btf and any("->" in a or ("=" in a and a.split("=")[1][:1].isalpha())
                                       for a in text.split()[2:]):
                self.log += ["[ 1.5] trace_kprobe: error: No BTF entry for this argument",
                             f"  Command: {text}", "            ^"]
                self._err(errno.ENOENT)
            if fn in self.absent:
                self.log += [f"[ 1.0] trace_kprobe: error: Invalid probed address or symbol",
                             f"  Command: {text}", "            ^"]
                self._err(errno.EINVAL)
            self.kprobes[head[2:]] = text
            return
        if rel.endswith("/tracing_on"):
            self.instances[rel.split("/")[1]]["tracing_on"] = text
            return
        inst, ev = self._event(rel)
        if rel.endswith("/trigger"):
            lst = self.triggers.setdefault((inst, ev), [])
            if ev.split("/")[1] in self.refuse_trigger and not text.startswith("!"):
                self.log += ["[ 2.0] hist:kprobes:x: error: Invalid key modifier",
                             f"  Command: {text}", "                 ^"]
                self._err(errno.EINVAL)
            if text.startswith("!"):
                if text[1:] not in lst:
                    self._err(errno.ENOENT)
                lst.remove(text[1:])
            else:
                lst.append(text)
        elif rel.endswith("/enable"):
            (self.enabled.add if text == "1" else self.enabled.discard)((inst, ev))
        else:
            raise AssertionError(f"unexpected write {rel}")

    def mkdir(self, rel):
        name = rel.split("/")[1]
        if name in self.instances:
            self._err(errno.EEXIST)
        self.instances[name] = {"tracing_on": "1"}

    def rmdir(self, rel):
        name = rel.split("/")[1]
        if any(t for (i, _), t in self.triggers.items() if i == name):
            self._err(errno.EBUSY)
        del self.instances[name]

    @property
    def empty(self):
        return not self.kprobes and not self.instances and not self.enabled and not any(
            self.triggers.values())


def test_install_read_remove():
    fs = FakeTracefs(absent={"kvm_mmu_split_huge_pages"})
    rec = R.Recorder(fs, group="s2split_t")
    rec.install()
    names = {p.function for p in R.PROBES}
    assert set(rec.traced) == names - {"kvm_mmu_split_huge_pages"}
    assert "Invalid probed address" in rec.missing["kvm_mmu_split_huge_pages"]
    assert fs.instances["s2split_t"]["tracing_on"] == "0"
    assert len(fs.enabled) == len(rec.traced)
    walk = fs.kprobes["s2split_t/kvm_pgtable_walk"]
    assert walk == "p:s2split_t/kvm_pgtable_walk kvm_pgtable_walk size=%x2:u64 cb=+0(%x3):u64"
    assert fs.kprobes["s2split_t/stage2_split_walker"].endswith(
        "level=+56(%x0):s8 visit=%x1:u32")

    # the kernel counts some calls; the snapshot has the fixture's keys
    fs.counts = {
        "kvm_pgtable_walk": {(("cb", "stage2_split_walker"),): (128, {"size": 268435456})},
        "stage2_split_walker": {(("level", 2), ("visit", 1)): (128, {}),
                                (("level", 3), ("visit", 1)): (65536, {})},
        "__kvm_tlb_flush_vmid_ipa_nsh": {(("level", -1),): (3, {})},
        "kvm_handle_guest_abort": {(("k", 0),): (7, {})},
        "kvm_pgtable_stage2_create_unlinked": {(("level", 2), ("force_pte", 1)): (128, {})},
    }
    first = rec.snapshot()
    assert first["kvm_pgtable_walk"] == {"cb=stage2_split_walker": {"hitcount": 128,
                                                                   "size": 268435456}}
    assert first["stage2_split_walker"]["level=3,visit=1"] == {"hitcount": 65536}
    assert first["__kvm_tlb_flush_vmid_ipa_nsh"] == {"level=-1": {"hitcount": 3}}
    assert first["kvm_handle_guest_abort"] == {"all": {"hitcount": 7}}
    assert first["kvm_pgtable_stage2_create_unlinked"] == {"level=2,force_pte=1":
                                                           {"hitcount": 128}}
    # ... then 5 more aborts and one more split: the phase is the difference
    fs.counts["kvm_handle_guest_abort"] = {(("k", 0),): (12, {})}
    fs.counts["stage2_split_walker"][(("level", 2), ("visit", 1))] = (129, {})
    phase = R.difference(rec.snapshot(), first)
    assert phase == {"calls": {"kvm_handle_guest_abort": 5, "stage2_split_walker": 1},
                     "detail": {"kvm_handle_guest_abort": {"all": {"hitcount": 5}},
                                "stage2_split_walker": {"level=2,visit=1": {"hitcount": 1}}}}
    assert rec.hits()["kvm_handle_guest_abort"] == (12, 0)

    assert rec.remove() == []
    assert fs.empty


def test_remove_reports_what_it_cannot_undo():
    fs = FakeTracefs()
    rec = R.Recorder(fs, group="g")
    rec.install()
    real_write = fs.write

    def stuck(rel, text, append=False):  # the kernel refuses to remove one trigger
        if rel.endswith("/kvm_pgtable_walk/trigger") and text.startswith("!"):
            raise OSError(errno.EIO, "Input/output error")
        real_write(rel, text, append)
    fs.write = stuck
    left = rec.remove()
    # that trigger stays, so its event and the instance stay busy: all three said
    assert any("trigger of kvm_pgtable_walk" in x for x in left)
    assert any("instances/g" in x for x in left)
    assert any("kprobe g/kvm_pgtable_walk" in x for x in left)
    # everything else was still removed
    assert set(fs.kprobes) == {"g/kvm_pgtable_walk"}


def test_parse_hist_dropped_and_sym_offsets():
    text = ("{ cb: [ffff8000801234] stage2_map_walker+0x0 } hitcount: 3  size: 12\n"
            "{ level:         -1 } hitcount:          2\n"
            "{ level:         -1 } hitcount:          1\n"
            "Totals:\n    Hits: 6\n    Entries: 2\n    Dropped: 4\n")
    counts, dropped = R.parse_hist(text)
    assert counts == {"cb=stage2_map_walker": {"hitcount": 3, "size": 12},
                      "level=-1": {"hitcount": 3}}
    assert dropped == 4


# -- the command, on a simulated host ---------------------------------------------------

@pytest.fixture
def fake_host(monkeypatch, tmp_path):
    fs = FakeTracefs(absent={"kvm_mmu_split_huge_pages"})
    monkeypatch.setattr(R, "cannot_record", lambda kvm, tracefs: None)
    monkeypatch.setattr(R, "Tracefs", lambda root: fs)
    # this test host's own kernel stays out of it: no kallsyms, command line or log
    monkeypatch.setattr(R, "KALLSYMS", str(tmp_path / "no-kallsyms"))
    monkeypatch.setattr(R, "CMDLINE", str(tmp_path / "no-cmdline"))
    monkeypatch.setattr(R, "_kernel_log", lambda: "")
    return fs


def _runs(fs, rec_args):
    """What record_runs returns for one tiny run whose phases saw some calls."""
    return [{"label": "no_manual_protect", "command": "dirty_log_perf_test -m 6 -b 1M -s "
             "anonymous -g -k 2M", "phases": [{"phase": "populate", "calls": {"x": 1},
                                                "detail": {"x": {"all": {"hitcount": 1}}}}],
             "problems": []}], {"arch": "aarch64"}


def test_record_writes_fixture_and_cleans_up(fake_host, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(R, "record_runs", lambda args, rec, write: _runs(fake_host, args))
    out = tmp_path / "k.json"
    assert main(["fidelity", "record", "-b", "1M", "-g", "-k", "2M", "--seed-synced",
                 "--kernel-variant", "skip-levels", "--tracefs", "/t", "--output",
                 str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "s2split-real-kernel-counts/1"
    assert doc["selftest_variant"] == "s2split-hw-seedfix"
    assert doc["kernel_variant"] == "skip-levels"
    assert "kvm_mmu_split_huge_pages" in doc["missing_functions"]
    assert "kvm_mmu_split_huge_pages" not in doc["traced_functions"]
    assert doc["kernel_release"] and doc["host"] == {"arch": "aarch64"}
    assert fake_host.empty
    assert "compare with: s2split fidelity" in capsys.readouterr().out


@pytest.mark.parametrize("failure,status,message", [
    (RuntimeError("harness crashed"), None, None),
    (KeyboardInterrupt(), 130, "interrupted"),
    ("SIGTERM", 2, "terminated by SIGTERM"),
])
def test_record_cleans_up_on_failure(fake_host, monkeypatch, tmp_path, capsys, failure,
                                     status, message):
    def run(args, rec, write):
        assert not fake_host.empty  # installed while the workload runs
        if failure == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        raise failure
    monkeypatch.setattr(R, "record_runs", run)
    out = tmp_path / "k.json"
    argv = ["fidelity", "record", "-b", "1M", "--tracefs", "/t", "--output", str(out)]
    before = signal.getsignal(signal.SIGTERM)
    if status is None:
        with pytest.raises(RuntimeError):
            main(argv)
    else:
        assert main(argv) == status
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert fake_host.empty
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is before


def test_this_host_cannot_record(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["fidelity", "record", "-b", "1M", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot record on this host" in err[0]
    assert not out.exists()


def test_recorder_needs_no_numpy(tmp_path):
    """The recorder runs where the harness runs, without numpy: with numpy and
    numba unimportable, ``python -m s2split.hw.record`` parses its options and
    reaches the host check (this host has no arm64 KVM to trace), one line and
    exit 2. The layers contract cannot say this statically: the harness it
    drives names the model in functions a recording never calls."""
    import subprocess
    import sys
    from pathlib import Path
    out = tmp_path / "k.json"
    code = ("import sys, runpy\n"
            "sys.modules['numpy'] = sys.modules['numba'] = None  # imports of them fail\n"
            "sys.argv = ['record'] + sys.argv[1:]\n"
            "runpy.run_module('s2split.hw.record', run_name='__main__')\n")
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=str(src))
    proc = subprocess.run([sys.executable, "-c", code, "-b", "1M", "--output", str(out),
                           "--kvm", str(tmp_path / "no-kvm")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot record on this host" in err[0], proc.stderr
    assert "numpy" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("machine,euid,kvm,tracefs,readme,expect", [
    ("x86_64", 0, True, True, True, "not arm64"),
    ("aarch64", 1000, True, True, True, "need root"),
    ("aarch64", 0, False, True, True, "no KVM"),
    ("aarch64", 0, True, False, True, "no tracefs"),
    ("aarch64", 0, True, True, False, "no hist triggers"),
    ("aarch64", 0, True, True, True, None),
])
def test_cannot_record_reasons(monkeypatch, tmp_path, machine, euid, kvm, tracefs, readme,
                               expect):
    monkeypatch.setattr(R.platform, "machine", lambda: machine)
    monkeypatch.setattr(R.os, "geteuid", lambda: euid)
    dev = tmp_path / "kvm"
    if kvm:
        dev.write_text("")
    root = tmp_path / "tracing"
    root.mkdir()
    (root / "README").write_text("  hist:keys=<field1[,field2,...]>\n" if readme else "x\n")
    why = R.cannot_record(str(dev), str(root) if tracefs else None)
    assert (why is None) if expect is None else (expect in why)


def test_output_is_required_and_db_refused(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["fidelity", "record", "-b", "1M"])
    assert main(["fidelity", "record", "--json", "x", "--output", str(tmp_path / "k")]) == 2


def test_fixture_format_matches_fidelity():
    from s2split.tasks.fidelity import FIXTURE_FORMAT
    assert R.FIXTURE_FORMAT == FIXTURE_FORMAT


def test_selftest_command_reads_back():
    # the command the recorder writes is what fidelity parses into the same run
    from s2split.tasks.fidelity import params_from_command
    from s2split.hw.params import HwParams
    from s2split.selftest.modes import MODES
    p = HwParams(vcpu_memory_bytes=1 << 20, vcpus=2, partition=False, manual_protect=False,
                 chunk_size=2 << 20, write_percent=50, random_access=True, seed=3,
                 mode=MODES[6])
    cmd = R.selftest_command(p, 4096, "vhe,fwb,-tlbirange,dic")
    m = params_from_command(cmd, "t")
    assert (m.vcpus, m.partition, m.manual_protect, m.chunk_size, m.write_percent,
            m.random_access, m.seed) == (2, False, False, 2 << 20, 50, True, 3)
    assert m.features.tlbirange is False


def test_unknown_kernel_variant_refused_before_anything_is_installed(fake_host, tmp_path,
                                                                     capsys):
    out = tmp_path / "k.json"
    assert main(["fidelity", "record", "--kernel-variant", "nope", "--tracefs", "/t",
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert fake_host.empty and not fake_host.log and not out.exists()


def test_refused_trigger_is_missing_and_undone():
    # one function the kernel cannot probe, then one whose trigger it refuses:
    # each gets its own reason (not the other's stale error_log entry)
    fs = FakeTracefs(absent={"kvm_pgtable_walk"}, refuse_trigger={"__kvm_pgtable_walk"})
    rec = R.Recorder(fs, group="g")
    rec.install()
    assert "Invalid probed address" in rec.missing["kvm_pgtable_walk"]
    assert "hist trigger or enable refused" in rec.missing["__kvm_pgtable_walk"]
    assert "Invalid key modifier" in rec.missing["__kvm_pgtable_walk"]
    assert "g/__kvm_pgtable_walk" not in fs.kprobes  # taken out at once
    assert "__kvm_pgtable_walk" not in rec.traced and "stage2_map_walker" in rec.traced
    assert rec.remove() == [] and fs.empty


# -- real kernels: clones, BTF arguments, EL2, the 6.17+ teardown -------------------------

AFF = "\n".join([
    "kvm_pgtable_walk", "__kvm_pgtable_walk", "stage2_map_walker", "stage2_attr_walker",
    # GCC emitted the split walker only as a clone (and a .cold part, not an entry)
    "stage2_split_walker.isra.0", "stage2_split_walker.cold",
    "stage2_unmap_walker", "stage2_free_walker", "leaf_walker", "kvm_pgtable_stage2_map",
    "kvm_pgtable_stage2_unmap", "kvm_pgtable_stage2_wrprotect",
    "kvm_pgtable_stage2_relax_perms", "kvm_pgtable_stage2_split",
    "kvm_pgtable_stage2_create_unlinked", "kvm_pgtable_stage2_free_unlinked",
    "kvm_pgtable_stage2_destroy_range", "kvm_pgtable_stage2_destroy_pgd",
    "kvm_arch_mmu_enable_log_dirty_pt_masked [kvm]", "__kvm_mmu_topup_memory_cache",
    "kvm_handle_guest_abort", "__kvm_tlb_flush_vmid_ipa", "__kvm_tlb_flush_vmid_ipa_nsh",
    "kvm_tlb_flush_vmid_range", "__kvm_tlb_flush_vmid_range", "__kvm_tlb_flush_vmid",
    # a different function whose name starts the same way: not a clone of it
    "stage2_split_walker_helper.isra.0"]) + "\n"


def test_record_resolves_an_isra_clone_from_available_filter_functions():
    fs = FakeTracefs(files={"available_filter_functions": AFF})
    rec = R.Recorder(fs, group="g", symbols=R.Symbols.parse(AFF))
    rec.install()
    # the clone is probed under an event name without dots, counted whole
    assert fs.kprobes["g/stage2_split_walker_isra_0"] == \
        "p:g/stage2_split_walker_isra_0 stage2_split_walker.isra.0 k=\\0"
    assert "stage2_split_walker" in rec.traced
    assert "stage2_split_walker.isra.0" in rec.how["stage2_split_walker"]
    assert not any("helper" in k or "cold" in k for k in fs.kprobes)
    # absent from both lists: inlined (and the pre-6.17 destroy), not guessed
    assert "kallsyms" in rec.missing["kvm_mmu_split_huge_pages"]
    assert "kallsyms" in rec.missing["kvm_pgtable_stage2_destroy"]
    # the 6.17+ teardown is probed
    assert {"kvm_pgtable_stage2_destroy_range", "kvm_pgtable_stage2_destroy_pgd"} <= \
        set(rec.traced)
    # the clone's counts are the function's
    fs.counts = {"stage2_split_walker_isra_0": {(("k", 0),): (7, {})}}
    assert rec.snapshot()["stage2_split_walker"] == {"all": {"hitcount": 7}}
    assert rec.hits()["stage2_split_walker"] == (7, 0)
    rec.remove()
    assert fs.empty


def test_symbols_from_kallsyms_and_clone_pattern():
    syms = R.Symbols.parse("", "ffff800080001000 t foo.constprop.0\n"
                           "ffff800080002000 T bar\nffff800080003000 d baz.isra.0\n"
                           "ffff800080004000 t qux.part.0.isra.0\n")
    assert syms.resolve("foo") == ["foo.constprop.0"]
    assert syms.resolve("bar") == ["bar"]
    assert syms.resolve("baz") == []  # a data symbol is no function
    assert syms.resolve("qux") == ["qux.part.0.isra.0"]


def test_btf_arguments_first_registers_as_fallback():
    readme = "\t  fetcharg: ..., [(structname[,field])]<argname>[->field[->field|.field...]],\n"
    assert R.btf_args(readme) and not R.btf_args("no such thing")
    fs = FakeTracefs()
    rec = R.Recorder(fs, group="g", btf=True)
    rec.install()
    assert fs.kprobes["g/stage2_split_walker"].endswith("level=ctx->level:s8 visit=visit:u32")
    assert fs.kprobes["g/__kvm_pgtable_walk"].endswith("level=level:s8")
    assert rec.how["__kvm_pgtable_walk"] == "BTF arguments"
    rec.remove()
    # a kernel that has BTF but refuses the names: the registers, and why
    fs = FakeTracefs(refuse_btf=True)
    rec = R.Recorder(fs, group="g", btf=True)
    rec.install()
    assert fs.kprobes["g/stage2_split_walker"].endswith("level=+56(%x0):s8 visit=%x1:u32")
    assert "No BTF entry" in rec.how["stage2_split_walker"]
    assert "stage2_split_walker" in rec.traced
    rec.remove()
    assert fs.empty


def test_kvm_mode():
    assert R.kvm_mode("root=/dev/vda kvm-arm.mode=nvhe") == "nvhe"
    assert R.kvm_mode("kvm-arm.mode=protected quiet") == "protected"
    assert R.kvm_mode("", "kvm [1]: VHE mode initialized successfully") == "vhe"
    assert R.kvm_mode("", "kvm [1]: Hyp nVHE mode initialized successfully") == "nvhe"
    assert R.kvm_mode("", "kvm [1]: Protected nVHE mode initialized successfully") == \
        "protected"
    assert R.kvm_mode("", "kvm [1]: Hyp hVHE mode initialized successfully") == "nvhe"
    assert R.kvm_mode("", "kvm [1]: VHE+NV2 mode initialized successfully") == "vhe"
    assert R.kvm_mode("", "kvm [1]: Hyp mode initialized successfully") == "nvhe"
    assert R.kvm_mode("", "") is None


@pytest.mark.parametrize("mode, gone", [
    ("nvhe", {"__kvm_tlb_flush_vmid_ipa", "__kvm_tlb_flush_vmid_ipa_nsh",
              "__kvm_tlb_flush_vmid_range", "__kvm_tlb_flush_vmid"}),
    ("protected", None),
])
def test_el2_functions_named_in_one_line_and_the_rest_recorded(fake_host, monkeypatch,
                                                                tmp_path, capsys, mode, gone):
    monkeypatch.setattr(R, "record_runs", lambda args, rec, write: _runs(fake_host, args))
    (tmp_path / "cmdline").write_text(f"root=/dev/vda kvm-arm.mode={mode}\n")
    monkeypatch.setattr(R, "CMDLINE", str(tmp_path / "cmdline"))
    out = tmp_path / "k.json"
    assert main(["fidelity", "record", "-b", "1M", "--tracefs", "/t", "--output",
                 str(out)]) == 0
    doc = json.loads(out.read_text())
    lines = [l for l in capsys.readouterr().out.splitlines() if "EL2" in l]
    assert len(lines) == 1 and lines[0].startswith(f"KVM runs in {mode} mode: ")
    el2 = {fn for fn, why in doc["missing_functions"].items() if "EL2" in why}
    if gone is None:  # protected: the table code too, but not the EL1 MMU layer
        assert {"stage2_split_walker", "kvm_pgtable_walk", "__kvm_tlb_flush_vmid"} <= el2
        assert "kvm_handle_guest_abort" in doc["traced_functions"]
    else:
        assert el2 == gone
        assert "stage2_split_walker" in doc["traced_functions"]
    assert doc["recorder"]["kvm_mode"] == mode
    assert not set(doc["traced_functions"]) & el2
    assert fake_host.empty
