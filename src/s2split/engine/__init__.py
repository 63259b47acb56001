"""Engines: the reference engine (the oracle) and the fast engine (for scale).

Both run the same workload through the same VM interface and produce the same
counters; :func:`get_engine` picks one (``auto`` uses the fast engine when it
can run the variant and the VM is large).
"""

from __future__ import annotations

from typing import Any

from ..arm64.versions import DEFAULT_KERNEL, kernel_rules
from ..plumbing.errors import S2Error
from .cache_location import ensure_location

ensure_location()  # before any engine module decorates a cached function

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
        from ..model.kvm.vm import VM
        return VM(geom, features, variant, host_va_bits, kernel)


def _as_list(variants: Any) -> list:
    if isinstance(variants, (list, tuple)):
        return list(variants)
    return [] if variants is None else [variants]


def engine_name(engine: str, params: Any = None, variants: Any = None) -> str:
    """What ``engine`` means for this run: ``auto`` is the fast engine for
    large runs when the fast engine can run every variant (walk flags, and
    visitors written with the visitor API), else the reference engine."""
    if engine not in ENGINES:
        raise S2Error(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    fast_capable = all(v.fast_capable for v in _as_list(variants))
    return "fast" if _big(params) and fast_capable else "reference"


def get_engine(engine: Any, params: Any = None, variants: Any = None) -> Any:
    """The engine to run ``params`` under ``variants`` (one variant or a list)."""
    if engine is None:
        return ReferenceEngine()
    if not isinstance(engine, str):
        return engine
    if engine_name(engine, params, variants) == "reference":
        return ReferenceEngine()
    from .vm import FastEngine, require_flag_only
    for v in _as_list(variants):
        require_flag_only(v)
    from .compile_cache import ensure_compiled
    ensure_compiled()
    return FastEngine()
