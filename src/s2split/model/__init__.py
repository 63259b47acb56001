"""The reference engine: the kernel's code as readable Python, and the
oracle the fast engine is checked against. :mod:`.pgtable` is
``arch/arm64/kvm/hyp/pgtable.c`` (one walker, small visitors, the variants);
:mod:`.kvm` is the KVM layer above it (``arch/arm64/kvm/mmu.c``,
``virt/kvm/kvm_main.c``): VMs, memslots, faults, dirty logging."""
