"""The command lines that select a matrix: one function, so that the report's
own command, the plan's and the cover letter's name the same options."""

from __future__ import annotations

from typing import Any

from ..arm64.arch import granule_name, size_name


def matrix_argv(m: Any, profile: str | None = None) -> list[str]:
    """The matrix options that select ``m`` (defaults left out); ``profile``:
    what ``--profile`` must say, when not the matrix's own option."""
    profile = m.profile if profile is None else profile
    argv = ["--size", size_name(m.size)]
    if m.granules != (4096, 16384, 65536):
        argv += ["--granule", ",".join(granule_name(g) for g in m.granules)]
    if m.backings != ("regular", "thp", "hugetlb"):
        argv += ["--backing", ",".join(m.backings)]
    if m.scenarios != ("clear", "enable"):
        argv += ["--scenario", ",".join(m.scenarios)]
    from ..model.pgtable.variants import DEFAULT_VARIANTS
    if tuple(m.variants) != tuple(DEFAULT_VARIANTS):
        argv += ["--variant", ",".join(m.variants)]
    if m.chunk is not None:
        argv += ["--chunk-size", size_name(m.chunk)]
    if m.iterations != 2:
        argv += ["--iterations", str(m.iterations)]
    if m.ipa_bits != 40:
        argv += ["--ipa-bits", str(m.ipa_bits)]
    if m.hugetlb_1g:
        argv.append("--hugetlb-1g")
    if profile != "server-vhe":
        argv += ["--profile", profile]
    if m.cpu:
        argv += ["--cpu", m.cpu]
    return argv
