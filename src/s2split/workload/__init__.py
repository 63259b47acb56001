"""The ``dirty_log_perf_test`` workload, as upstream runs it (Linux 6.12 selftests).

memstress places the test memory at the top of the guest physical address
space -- one page below the end, aligned down to the backing page size -- and
splits it into ``-x`` memslots and ``-v`` vCPU regions. Every vCPU then makes
passes over its region, touching one word per page: the populate pass writes
every page in order; each iteration's pass writes ``-w`` percent of the pages
(``-a``: at random pages) using the selftests' Park-Miller generator, whose
state persists across passes. Each pass ends with a ``GUEST_SYNC``, an MMIO
exit.

The phases, in order: ``create_vm``, ``populate``, ``enable_dirty_logging``,
then per iteration ``iterN_dirty``, ``iterN_get_dirty_log`` and (manual-protect)
``iterN_clear_dirty_log``, then ``disable_dirty_logging`` and ``destroy_vm``.

A note on seeds: since Linux 6.10 memstress seeds vCPU ``k`` with
``guest_random_seed + k``, but ``guest_random_seed`` is never copied into the
guest, whose copy stays 0. Upstream therefore seeds vCPU ``k`` with ``k``
whatever ``-r`` says (vCPU 0's generator is stuck at 0). ``seed_synced=False``
(the default) reproduces that; ``seed_synced=True`` gives the intended
``seed + k`` (what 6.2-6.9 did).

:mod:`.params` holds a run's parameters (:class:`PerfTestParams`, the
layout), :mod:`.run` the run itself; their public names are here too.
"""

from ..selftest.memstress import Layout, guest_random_u32
from ..selftest.modes import parse_mode
from .params import DEFAULT_PER_VCPU_MEM_SIZE, KVM_MAX_VCPUS, PerfTestParams, memstress_layout
from .run import PHASE_OPS, RunResult, phase_ops, phase_steps, run_perf_test, run_variants

__all__ = ["PerfTestParams", "Layout", "memstress_layout", "run_perf_test", "run_variants",
           "RunResult", "phase_steps", "phase_ops", "PHASE_OPS", "DEFAULT_PER_VCPU_MEM_SIZE",
           "KVM_MAX_VCPUS", "guest_random_u32", "parse_mode"]
