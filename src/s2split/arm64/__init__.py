"""The arm64 architecture and the kernel's rules on it, as data and small
pure functions: translation geometry (:mod:`.arch`), descriptor bits
(:mod:`.bits`, :mod:`.pte`), the kernel's stage-2 rules (:mod:`.rules`), CPU
features and errata (:mod:`.features`), the memory hierarchy table reads hit
(:mod:`.hierarchy`), the KVM ABI (:mod:`.uapi`) and what differs between
kernel releases (:mod:`.versions`). Nothing here imports numpy."""
