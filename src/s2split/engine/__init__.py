"""Engines: the reference engine (the oracle) and the fast engine (for scale).

Both run the same workload through the same VM interface and produce the same
counters; :func:`get_engine` picks one (``auto`` uses the fast engine when it
can run the variant and the VM is large).
"""

from __future__ import annotations

from typing import Any

from ..errors import S2Error
from ..versions import DEFAULT_KERNEL, kernel_rules

ENGINES = ("auto", "reference", "fast")

#: ``auto`` switches to the fast engine at this much guest memory,
AUTO_FAST_BYTES = 64 << 20
#: or at this many teardown walks (6.19 rules walk the IPA space chunk by chunk:
#: 2^27 walks on 16K pages with a 52-bit IPA, minutes on the reference engine).
AUTO_FAST_DESTROY_WALKS = 1 << 16


def _big(params: Any) -> bool:
    if params is None:
        return False
    if params.vcpus * params.vcpu_memory_bytes >= AUTO_FAST_BYTES:
        return True
    if kernel_rules(params.kernel).chunked_destroy:
        g = params.geometry()
        return g.ipa_size // g.granule_size(g.min_block_level) >= AUTO_FAST_DESTROY_WALKS
    return False


class ReferenceEngine:
    name = "reference"

    def create_vm(self, geom, features, variant, host_va_bits, kernel=DEFAULT_KERNEL):
        from ..kvm.vm import VM
        return VM(geom, features, variant, host_va_bits, kernel)


def get_engine(engine: Any, params: Any = None, variant: Any = None) -> Any:
    if engine is None or engine == "reference":
        return ReferenceEngine()
    if not isinstance(engine, str):
        return engine
    if engine == "fast":
        from .fast import FastEngine
        if variant is not None and not variant.flag_only:
            raise S2Error(f"variant {variant.name!r} replaces a visitor; only the reference "
                          "engine can run it")
        return FastEngine()
    if engine == "auto":
        if _big(params) and (variant is None or variant.flag_only):
            try:
                from .fast import FastEngine
            except ImportError:  # pragma: no cover - numba is a dependency
                return ReferenceEngine()
            return FastEngine()
        return ReferenceEngine()
    raise S2Error(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")
