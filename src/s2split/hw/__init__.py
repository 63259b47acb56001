"""Real hardware: the KVM harness.

Nothing here imports numpy, so the harness (``python3 -m s2split.hw run``)
runs on a minimal Python. The CPU features the model's stage-2 code depends
on are not here but in :mod:`s2split.arm64.features`.

Submodules:

* :mod:`.kvm` -- a KVM userspace driver on ``/dev/kvm`` (ioctls, memslots,
  backing memory, vCPUs), standard library only;
* :mod:`.guest` -- the guest programs (AArch64 and x86-64 machine code);
* :mod:`.machine` -- a VM running them: memslot 0, the vCPUs, the passes;
* :mod:`.params`, :mod:`.harness` -- ``s2split hw run``: the
  ``dirty_log_perf_test`` phases, timed from userspace;
* :mod:`.backing_check` -- what really backs the measured memory (THP,
  hugetlb coverage) and the host settings that walk it in the background;
* :mod:`.fingerprint` -- what identifies the host a result came from;
* :mod:`.selftest` -- parser of the upstream ``dirty_log_perf_test`` output;
* :mod:`.compare` -- statistics between two labelled result sets;
* :mod:`.record` -- ``s2split fidelity record``: the real kernel's stage-2
  call counts (kprobe events, hist triggers) as a fidelity fixture, with
  :mod:`.probes` naming the functions and how each is found;
* :mod:`.cli` -- the ``s2split hw`` subcommands.
"""
