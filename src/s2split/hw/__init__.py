"""Real hardware: the KVM harness.

Nothing here imports numpy, so the harness (``python3 -m s2split.hw run``)
runs on a minimal Python. The CPU features the model's stage-2 code depends
on are not here but in the core, :mod:`s2split.arm64.features`.

Submodules:

* :mod:`.kvm` -- a KVM userspace driver on ``/dev/kvm`` (ioctls, memslots,
  backing memory, vCPUs), standard library only;
* :mod:`.guest` -- the guest programs (AArch64 and x86-64 machine code);
* :mod:`.params`, :mod:`.harness` -- ``s2split hw run``: the
  ``dirty_log_perf_test`` phases, timed from userspace;
* :mod:`.fingerprint` -- what identifies the host a result came from;
* :mod:`.selftest` -- parser of the upstream ``dirty_log_perf_test`` output;
* :mod:`.compare` -- statistics between two labelled result sets;
* :mod:`.record` -- ``s2split fidelity record``: the real kernel's stage-2
  call counts (kprobe events, hist triggers) as a fidelity fixture;
* :mod:`.cli` -- the ``s2split hw`` subcommands.
"""
