"""s2split: how much work arm64 KVM's stage-2 code does when it splits huge
pages for dirty logging, and how much walker optimizations save."""

#: Part of every stored cell's key: bump it whenever any count can change, so
#: that a results store never reuses counts of an older model.
__version__ = "0.2.0"
