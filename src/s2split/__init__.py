"""s2split: how much work arm64 KVM's stage-2 code does when it splits huge
pages for dirty logging, and how much walker optimizations save."""

__version__ = "0.1.0"
