"""What the subcommands compute, each in its own module: ``reproduce`` and
its matrix, ``perf-test``, ``explain`` and the per-iteration split,
``calibrate``, ``fidelity`` (with the interleaving and background walks of
the real kernel), the variant checks (``variants --check``) and ``demo``.
Reports and the command line present their results."""
