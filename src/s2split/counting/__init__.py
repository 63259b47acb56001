"""What is counted: the model's counters by operation and level
(:mod:`.counters`), a run's tallies (:mod:`.counts`) and the kernel
functions and instructions they stand for in each release
(:mod:`.kernel_counters`)."""
