"""What identifies the host a measurement came from (standard library only).

Kernel release, version and command line; CPU model (x86 ``model name``; arm64
MIDR_EL1 and the implementer/part numbers); base page size; THP settings;
hugetlb pool sizes; the machine (device tree model, DMI product); the KVM
capability values this harness depends on; the KVM module parameters. Every
value is read from /proc and /sys; what is missing is left out, never guessed.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from .backing_check import host_settings, read_setting, selected
from .kvm import (CAP_NAMES, KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES,
                  KVM_CAP_ARM_VM_IPA_SIZE, KVM_CAP_DIRTY_LOG_RING,
                  KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_MAX_VCPUS, KVM_CAP_NR_MEMSLOTS,
                  KVM_CAP_USER_MEMORY2, Kvm, KvmError, host_page_size)

SYSTEM_CAPS = (KVM_CAP_ARM_VM_IPA_SIZE, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
               KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES,
               KVM_CAP_USER_MEMORY2, KVM_CAP_MAX_VCPUS, KVM_CAP_NR_MEMSLOTS,
               KVM_CAP_DIRTY_LOG_RING)


def cpu_model() -> dict[str, Any]:
    info: dict[str, Any] = {}
    text = read_setting("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "CPU implementer", "CPU architecture", "CPU variant",
                   "CPU part", "CPU revision", "vendor_id", "cpu family", "model",
                   "stepping", "microcode") and key not in info:
            info[key] = value
    midr = read_setting("/sys/devices/system/cpu/cpu0/regs/identification/midr_el1")
    if midr:
        info["midr_el1"] = midr
    info["cpus"] = os.cpu_count()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith(("flags", "Features"))), [])
    info["hypervisor_flag"] = "hypervisor" in flags
    return info


def hugetlb() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for line in (read_setting("/proc/meminfo") or "").splitlines():
        if line.startswith(("HugePages_Total", "HugePages_Free", "Hugepagesize")):
            k, _, v = line.partition(":")
            out[k] = v.strip()
    pools = {}
    base = Path("/sys/kernel/mm/hugepages")
    if base.is_dir():
        for d in sorted(base.iterdir()):
            nr = read_setting(d / "nr_hugepages")
            if nr is not None:
                pools[d.name.removeprefix("hugepages-")] = int(nr)
    out["pools"] = pools
    return out


def thp() -> dict[str, Any]:
    base = Path("/sys/kernel/mm/transparent_hugepage")
    if not base.is_dir():
        return {"configured": False}
    out: dict[str, Any] = {"configured": True,
                           "enabled": selected(read_setting(base / "enabled")),
                           "defrag": selected(read_setting(base / "defrag")),
                           "hpage_pmd_size": read_setting(base / "hpage_pmd_size")}
    shmem = read_setting(base / "shmem_enabled")
    if shmem:
        out["shmem_enabled"] = selected(shmem)
    return out


def machine() -> dict[str, Any]:
    out: dict[str, Any] = {}
    model = read_setting("/proc/device-tree/model") or read_setting("/sys/firmware/devicetree/base/model")
    if model:
        out["dt_model"] = model.rstrip("\x00")
    compat = read_setting("/proc/device-tree/compatible")
    if compat:
        out["dt_compatible"] = [c for c in compat.split("\x00") if c]
    for key in ("sys_vendor", "product_name"):
        v = read_setting(f"/sys/class/dmi/id/{key}")
        if v:
            out[f"dmi_{key}"] = v
    return out


def kvm_module_params() -> dict[str, str]:
    out = {}
    for mod in ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm"):
        d = Path(f"/sys/module/{mod}/parameters")
        if d.is_dir():
            for f in sorted(d.iterdir()):
                v = read_setting(f)
                if v is not None:
                    out[f"{mod}.{f.name}"] = v
    return out


def kvm_capabilities(kvm: Kvm | None = None) -> dict[str, int]:
    """System-wide ``KVM_CHECK_EXTENSION`` values (per-VM values are recorded
    by the harness from the VM it measures)."""
    own = kvm is None
    try:
        kvm = kvm or Kvm()
    except KvmError:
        return {}
    try:
        return {CAP_NAMES[c]: kvm.check_extension(c) for c in SYSTEM_CAPS}
    finally:
        if own:
            kvm.close()


def fingerprint(kvm: Kvm | None = None) -> dict[str, Any]:
    u = os.uname()
    return {
        "arch": platform.machine(),
        "kernel_release": u.release,
        "kernel_version": u.version,
        "kernel_cmdline": read_setting("/proc/cmdline"),
        "cpu": cpu_model(),
        "page_size": host_page_size(),
        "thp": thp(),
        "hugetlb": hugetlb(),
        "machine": machine(),
        "kvm_capabilities": kvm_capabilities(kvm),
        "kvm_module_params": kvm_module_params(),
        "settings": host_settings(),
        "python": platform.python_version(),
    }


def describe(fp: dict[str, Any]) -> str:
    """One line: kernel, CPU, page size."""
    cpu = fp.get("cpu", {})
    name = cpu.get("model name") or (f"MIDR {cpu['midr_el1']}" if cpu.get("midr_el1") else
                                     f"implementer {cpu.get('CPU implementer', '?')} part "
                                     f"{cpu.get('CPU part', '?')}")
    return (f"{fp.get('arch', '?')} {fp.get('kernel_release', '?')}, {name}, "
            f"{cpu.get('cpus', '?')} CPUs, {fp.get('page_size', 0) // 1024}K pages")
