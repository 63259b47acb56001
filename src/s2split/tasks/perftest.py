"""``perf-test``'s model configurations from its parsed options, for the
command line, the fidelity fixtures' recorded commands and calibration's
measurement files (the options themselves: :mod:`s2split.selftest.options`)."""

from __future__ import annotations

import argparse

from ..arm64.arch import parse_granule
from ..arm64.features import Features
from ..estimate.cost import load_profile
from ..selftest.options import selected_modes
from ..workload import PerfTestParams


def perf_test_params(args: argparse.Namespace) -> list[PerfTestParams]:
    """Params for each selected mode, from parsed options."""
    profile = load_profile(args.profile)
    features = profile.features
    if args.cpu:
        features = Features.parse(args.cpu, base=features)
    modes = selected_modes(args)
    host_page = None if args.host_page_size is None else parse_granule(args.host_page_size)
    out = []
    for mode in modes:
        p = PerfTestParams(
            vcpu_memory_bytes=args.vcpu_memory_bytes, vcpus=args.vcpus, backing=args.backing,
            manual_protect=not args.no_manual, iterations=args.iterations, mode=mode,
            slots=args.slots, write_percent=args.write_percent,
            random_access=args.random_access, partition=not args.overlap, seed=args.seed,
            chunk_size=args.chunk_size or 0, seed_synced=args.seed_synced, features=features,
            host_va_bits=args.host_va_bits, lpa2=args.lpa2, kernel=args.kernel,
            selftest=getattr(args, "selftest", None), host_page_size=host_page)
        p.geometry()  # validate the IPA size for this granule now
        p.backing_type()
        out.append(p)
    return out
