"""Safe objects over the KVM ioctls of :mod:`pymig._core.kvm`.

``Kvm`` (/dev/kvm: API version, capabilities, MSRs to save, TSC kHz) → ``Vm`` (slots, vCPUs)
→ ``MemorySlot`` (a RamBlock in the guest, its dirty log) and ``Vcpu`` (kvm_run, exits);
``KvmRuntime`` adds vCPU threads and devices; ``cpustate`` captures and restores vCPUs.
Each object owns its file descriptor and closes it.
"""

from pymig.errors import UnsupportedCapability
from pymig.kvm.system import Kvm
from pymig.kvm.vm import MemorySlot, Vm
from pymig.kvm.vcpu import Vcpu, VcpuThread

__all__ = ["Kvm", "MemorySlot", "UnsupportedCapability", "Vcpu", "VcpuThread", "Vm"]
