"""``Kvm``: the /dev/kvm handle, and what this host's KVM offers."""

from __future__ import annotations

import errno
import os
from functools import cached_property
from typing import TYPE_CHECKING

from pymig._core import kvm as _kvm
from pymig.errors import KvmError, UnsupportedCapability

if TYPE_CHECKING:
    from pymig.kvm.vm import Vm

KVM_API_VERSION = 12
KVM_PATH = "/dev/kvm"


class Kvm:
    """An open /dev/kvm.  Owns its file descriptor; close() (or ``with``) releases it.

    What the scratch-vCPU probes learn about the host (readable and migratable MSRs, TSC kHz)
    is kept for the whole process: it does not change, and a probe costs tens of ms that must
    not land in a migration's downtime.
    """

    _host_probe: tuple[list[int], int] | None = None
    _migratable: dict[bool, list[int]] = {}

    def __init__(self, path: str = KVM_PATH):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.api_version = _kvm.get_api_version(self.fd)
            if self.api_version != KVM_API_VERSION:
                raise KvmError(errno.EINVAL, "KVM_GET_API_VERSION",
                               f"API version {self.api_version}, pymig needs {KVM_API_VERSION}")
        except BaseException:
            os.close(self.fd)
            raise

    def check(self, cap: str | int) -> int:
        """KVM_CHECK_EXTENSION by name (``"KVM_CAP_IRQCHIP"``) or number; 0 = absent."""
        return _kvm.check_extension(self.fd, _cap_number(cap))

    def require(self, cap: str | int, what: str = "") -> int:
        """The capability's value, or :class:`UnsupportedCapability` when it is absent."""
        value = self.check(cap)
        if value <= 0:
            raise UnsupportedCapability(cap if isinstance(cap, str) else f"capability {cap}",
                                        what)
        return value

    def capabilities(self) -> dict[str, int]:
        """Every capability pymig knows by name, with this host's value."""
        return {name: self.check(number) for name, number in sorted(_kvm.CAPS.items())}

    @cached_property
    def vcpu_mmap_size(self) -> int:
        return _kvm.get_vcpu_mmap_size(self.fd)

    @cached_property
    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM says it saves and restores."""
        return _kvm.get_msr_index_list(self.fd)

    @cached_property
    def supported_cpuid(self) -> list[tuple[int, ...]]:
        return _kvm.get_supported_cpuid(self.fd)

    @property
    def _probe(self) -> tuple[list[int], int]:
        if Kvm._host_probe is None:
            Kvm._host_probe = self._probe_scratch_vcpu()
        return Kvm._host_probe

    def _probe_scratch_vcpu(self) -> tuple[list[int], int]:
        """Ask a scratch vCPU which listed MSRs KVM_GET_MSRS really returns, and the TSC kHz."""
        vm_fd = _kvm.create_vm(self.fd)
        try:
            vcpu_fd = _kvm.create_vcpu(vm_fd, 0)
            try:
                readable = [i for i in self.msr_index_list
                            if len(_kvm.get_msrs(vcpu_fd, [i])) == 1]
                return readable, _kvm.get_tsc_khz(vcpu_fd)
            finally:
                os.close(vcpu_fd)
        finally:
            os.close(vm_fd)

    @property
    def supported_msrs(self) -> list[int]:
        """The MSRs to save per vCPU: the index list filtered to what KVM_GET_MSRS returns."""
        return self._probe[0]

    @property
    def tsc_khz(self) -> int:
        """The guest TSC frequency KVM gives new vCPUs (KVM_GET_TSC_KHZ)."""
        return self._probe[1]

    def migratable_msrs(self, irqchip: bool) -> list[int]:
        """The MSRs a vCPU's state carries: those of :attr:`supported_msrs` that KVM also
        takes back (KVM_SET_MSRS of the value just read) on a scratch vCPU of a VM built the
        same way.  Some depend on the VM: without an in-kernel irqchip KVM refuses e.g.
        MSR_KVM_ASYNC_PF_INT (0x4b564d06), so a state saved there never carries it."""
        if irqchip not in Kvm._migratable:
            from pymig.kvm.vcpu import cpuid_for

            vm_fd = _kvm.create_vm(self.fd)
            try:
                if irqchip:
                    _kvm.create_irqchip(vm_fd)
                vcpu_fd = _kvm.create_vcpu(vm_fd, 0)
                try:
                    _kvm.set_cpuid2(vcpu_fd, cpuid_for(self.supported_cpuid, 0))
                    Kvm._migratable[irqchip] = [
                        i for i in self.supported_msrs
                        if _kvm.set_msrs(vcpu_fd, [i], _kvm.get_msrs(vcpu_fd, [i])) == 1]
                finally:
                    os.close(vcpu_fd)
            finally:
                os.close(vm_fd)
        return Kvm._migratable[irqchip]

    def create_vm(self, **options) -> "Vm":
        from pymig.kvm.vm import Vm

        return Vm(self, **options)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cap_number(cap: str | int) -> int:
    if isinstance(cap, int):
        return cap
    try:
        return _kvm.CAPS[cap]
    except KeyError:
        raise ValueError(f"unknown capability name {cap!r}") from None
