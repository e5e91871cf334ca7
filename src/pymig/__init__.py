"""pymig: pre-copy live migration of KVM guests."""

__version__ = "0.1.0"
