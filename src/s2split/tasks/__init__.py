"""What the subcommands compute, each in its own module: ``reproduce`` (the
matrix) and ``perftest`` (``perf-test``); ``explain`` and ``per_iteration``
(first split and steady state); ``calibrate``, and ``calibrate_savings`` with
``savings_table`` (``calibrate --savings``); ``fidelity`` with
``interleaving`` and ``background`` (what the real kernel's counts may add);
``variant_check`` and ``mmu_check`` (``variants --check``); ``demo``.
Reports and the command line present their results."""
