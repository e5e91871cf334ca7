"""The fault campaign: ``python -m pymig.faults`` (see :mod:`pymig.faults.runner`)."""
