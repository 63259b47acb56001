"""The KVM layer of the reference engine; importing it registers the
built-in variants above the walker (:mod:`s2split.model.kvm.mmu_variants`)."""

from . import mmu_variants  # noqa: F401
