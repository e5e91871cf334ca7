# cython: language_level=3, boundscheck=False, wraparound=False
"""The one module that calls ``ioctl`` on /dev/kvm, a VM or a vCPU.

Each ioctl has one small function here; its docstring names the ioctl, the capability that
guarantees it and the errnos callers should expect.  Structs and request numbers come from
``linux/kvm.h`` itself, and the layouts pymig depends on are checked at compile time
(``_Static_assert`` below), so a header that disagrees fails the build rather than a guest.

Every failure raises :class:`pymig.errors.KvmError` (an ``OSError``) with the errno and the
ioctl's name.  Every ioctl runs with the GIL released: KVM_RUN blocks for as long as the guest
runs, and the slot and dirty-log calls take milliseconds on large slots.

Functions taking a raw host address are named ``_unsafe_*``; their "Safety:" paragraph says
what the caller must guarantee.  The safe objects in :mod:`pymig.kvm` are the only callers.

vCPU kicks: :func:`install_kick_handler` installs a no-op C handler (no ``SA_RESTART``) for one
real-time signal, so ``pthread_kill`` on a vCPU thread makes a blocking KVM_RUN return
``EINTR``; paired with ``kvm_run.immediate_exit`` this is race-free (a kick that lands just
before KVM_RUN still makes it return at once).  Python-level signal handlers are never involved.
:func:`run_gated` and :class:`RunGate` let a kicked vCPU park for a pause inside the KVM_RUN
call, without the GIL, and its requester wait for that on the same struct.
"""

from libc.errno cimport EINTR, EAGAIN, EINVAL, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from pymig.errors import KvmError

cdef extern from "sys/ioctl.h" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from *:
    """
    #include <errno.h>
    #include <pthread.h>
    #include <signal.h>
    #include <stddef.h>
    #include <string.h>
    #include <linux/kvm.h>

    /* Layouts pymig relies on (kernel ABI; a mismatch must fail the build). */
    _Static_assert(sizeof(struct kvm_userspace_memory_region) == 32, "memory region layout");
    _Static_assert(sizeof(struct kvm_dirty_log) == 16, "kvm_dirty_log size");
    _Static_assert(offsetof(struct kvm_dirty_log, dirty_bitmap) == 8, "kvm_dirty_log bitmap");
    _Static_assert(sizeof(struct kvm_clear_dirty_log) == 24, "kvm_clear_dirty_log size");
    _Static_assert(offsetof(struct kvm_clear_dirty_log, first_page) == 8, "clear first_page");
    _Static_assert(offsetof(struct kvm_clear_dirty_log, dirty_bitmap) == 16, "clear bitmap");
    _Static_assert(offsetof(struct kvm_run, immediate_exit) == 1, "kvm_run.immediate_exit");
    _Static_assert(offsetof(struct kvm_run, exit_reason) == 8, "kvm_run.exit_reason");
    _Static_assert(offsetof(struct kvm_run, io) == 32, "kvm_run exit union");
    _Static_assert(sizeof(struct kvm_regs) == 144, "kvm_regs");
    _Static_assert(sizeof(struct kvm_segment) == 24, "kvm_segment");
    _Static_assert(sizeof(struct kvm_sregs) == 312, "kvm_sregs");
    _Static_assert(sizeof(struct kvm_lapic_state) == 1024, "kvm_lapic_state");
    _Static_assert(sizeof(struct kvm_xsave) == 4096, "kvm_xsave");
    _Static_assert(sizeof(struct kvm_xcrs) == 392, "kvm_xcrs");
    _Static_assert(sizeof(struct kvm_vcpu_events) == 64, "kvm_vcpu_events");
    _Static_assert(sizeof(struct kvm_debugregs) == 128, "kvm_debugregs");
    _Static_assert(sizeof(struct kvm_msr_entry) == 16, "kvm_msr_entry");
    _Static_assert(sizeof(struct kvm_cpuid_entry2) == 40, "kvm_cpuid_entry2");
    _Static_assert(sizeof(unsigned long) == 8, "dirty bitmaps are 64-bit words");
    _Static_assert(sizeof(struct kvm_dirty_gfn) == 16, "kvm_dirty_gfn");
    _Static_assert(offsetof(struct kvm_dirty_gfn, offset) == 8, "kvm_dirty_gfn.offset");

    /* Collect the dirty entries of one vCPU's ring from *fetch on: (slot, offset) pairs into
     * the output arrays, each entry handed back to KVM (flags = RESET) once read.  Stops at
     * the first entry KVM has not published, or when the output is full.  The flags load is
     * an acquire and the store a release: KVM publishes slot/offset before the DIRTY flag. */
    static long pymig_harvest_ring(struct kvm_dirty_gfn *ring, unsigned int entries,
                                   unsigned long long *fetch, long long *slots,
                                   long long *offsets, long capacity)
    {
        long n = 0;
        while (n < capacity) {
            struct kvm_dirty_gfn *e = &ring[*fetch & (entries - 1)];
            if (!(__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY))
                break;
            slots[n] = e->slot;
            offsets[n] = (long long)e->offset;
            __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
            (*fetch)++;
            n++;
        }
        return n;
    }

    #define PYMIG_KICK_OFFSET 3

    static void pymig_kick_handler(int sig) { (void)sig; }

    static int pymig_kick_signal(void) { return SIGRTMIN + PYMIG_KICK_OFFSET; }

    static int pymig_install_kick_handler(void)
    {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = pymig_kick_handler;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = 0;  /* no SA_RESTART: KVM_RUN must return EINTR */
        return sigaction(pymig_kick_signal(), &sa, NULL) == 0 ? 0 : -errno;
    }

    static int pymig_unblock_kick(void)
    {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, pymig_kick_signal());
        return -pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    }

    static unsigned long pymig_thread_self(void) { return (unsigned long)pthread_self(); }

    static int pymig_kick_thread(unsigned long tid)
    {
        return -pthread_kill((pthread_t)tid, pymig_kick_signal());
    }
    """
    int pymig_kick_signal() nogil
    int pymig_install_kick_handler() nogil
    int pymig_unblock_kick() nogil
    unsigned long pymig_thread_self() nogil
    int pymig_kick_thread(unsigned long tid) nogil
    struct kvm_dirty_gfn
    long pymig_harvest_ring(kvm_dirty_gfn *ring, unsigned int entries,
                            unsigned long long *fetch, long long *slots, long long *offsets,
                            long capacity) nogil

ctypedef uint8_t __u8
ctypedef uint16_t __u16
ctypedef uint32_t __u32
ctypedef unsigned long long __u64

cdef extern from "linux/kvm.h":
    const unsigned long KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_CHECK_EXTENSION
    const unsigned long KVM_GET_VCPU_MMAP_SIZE, KVM_GET_MSR_INDEX_LIST, KVM_GET_SUPPORTED_CPUID
    const unsigned long KVM_ENABLE_CAP, KVM_SET_TSS_ADDR, KVM_SET_IDENTITY_MAP_ADDR
    const unsigned long KVM_CREATE_IRQCHIP, KVM_SET_USER_MEMORY_REGION
    const unsigned long KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG, KVM_CREATE_VCPU, KVM_RUN
    const unsigned long KVM_GET_REGS, KVM_SET_REGS, KVM_GET_SREGS, KVM_SET_SREGS
    const unsigned long KVM_GET_XSAVE, KVM_GET_XSAVE2, KVM_SET_XSAVE, KVM_GET_XCRS, KVM_SET_XCRS
    const unsigned long KVM_GET_MSRS, KVM_SET_MSRS, KVM_GET_LAPIC, KVM_SET_LAPIC
    const unsigned long KVM_GET_MP_STATE, KVM_SET_MP_STATE
    const unsigned long KVM_GET_VCPU_EVENTS, KVM_SET_VCPU_EVENTS
    const unsigned long KVM_GET_DEBUGREGS, KVM_SET_DEBUGREGS, KVM_GET_TSC_KHZ, KVM_SET_CPUID2
    const unsigned long KVM_RESET_DIRTY_RINGS

    struct kvm_userspace_memory_region:
        __u32 slot
        __u32 flags
        __u64 guest_phys_addr
        __u64 memory_size
        __u64 userspace_addr

    struct kvm_dirty_log:
        __u32 slot
        void *dirty_bitmap

    struct kvm_clear_dirty_log:
        __u32 slot
        __u32 num_pages
        __u64 first_page
        void *dirty_bitmap

    struct kvm_enable_cap:
        __u32 cap
        __u32 flags
        __u64 args[4]

    struct kvm_regs:
        __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp
        __u64 r8, r9, r10, r11, r12, r13, r14, r15
        __u64 rip, rflags

    struct kvm_segment:
        __u64 base
        __u32 limit
        __u16 selector
        __u8 type
        __u8 present, dpl, db, s, l, g, avl
        __u8 unusable
        __u8 padding

    struct kvm_dtable:
        __u64 base
        __u16 limit
        __u16 padding[3]

    struct kvm_sregs:
        kvm_segment cs, ds, es, fs, gs, ss, tr, ldt
        kvm_dtable gdt, idt
        __u64 cr0, cr2, cr3, cr4, cr8
        __u64 efer
        __u64 apic_base
        __u64 interrupt_bitmap[4]

    struct kvm_xcr:
        __u32 xcr
        __u64 value

    struct kvm_xcrs:
        __u32 nr_xcrs
        __u32 flags
        kvm_xcr xcrs[16]

    struct kvm_msr_entry:
        __u32 index
        __u64 data

    struct kvm_msrs:
        __u32 nmsrs
        kvm_msr_entry entries[1]

    struct kvm_msr_list:
        __u32 nmsrs
        __u32 indices[1]

    struct kvm_cpuid_entry2:
        __u32 function
        __u32 index
        __u32 flags
        __u32 eax, ebx, ecx, edx

    struct kvm_cpuid2:
        __u32 nent
        kvm_cpuid_entry2 entries[1]

    struct kvm_lapic_state:
        char regs[1024]

    struct kvm_mp_state:
        __u32 mp_state

    # Nested anonymous structs: only their members are ever named in generated code.
    struct _ev_exception:
        __u8 injected, nr, has_error_code, pending
        __u32 error_code

    struct _ev_interrupt:
        __u8 injected, nr, soft, shadow

    struct _ev_nmi:
        __u8 injected, pending, masked

    struct _ev_smi:
        __u8 smm, pending, smm_inside_nmi, latched_init

    struct _ev_triple_fault:
        __u8 pending

    struct kvm_vcpu_events:
        _ev_exception exception
        _ev_interrupt interrupt
        _ev_nmi nmi
        __u32 sipi_vector
        __u32 flags
        _ev_smi smi
        _ev_triple_fault triple_fault
        __u8 exception_has_payload
        __u64 exception_payload

    struct kvm_debugregs:
        __u64 db[4]
        __u64 dr6
        __u64 dr7
        __u64 flags

    struct _run_hw:
        __u64 hardware_exit_reason

    struct _run_fail_entry:
        __u64 hardware_entry_failure_reason
        __u32 cpu

    struct _run_ex:
        __u32 exception
        __u32 error_code

    struct _run_io:
        __u8 direction
        __u8 size
        __u16 port
        __u32 count
        __u64 data_offset

    struct _run_mmio:
        __u64 phys_addr
        __u8 data[8]
        __u32 len
        __u8 is_write

    struct _run_internal:
        __u32 suberror
        __u32 ndata
        __u64 data[16]

    struct _run_system_event:
        __u32 type
        __u32 ndata

    struct kvm_run:
        __u8 immediate_exit
        __u32 exit_reason
        _run_hw hw
        _run_fail_entry fail_entry
        _run_ex ex
        _run_io io
        _run_mmio mmio
        _run_internal internal
        _run_system_event system_event


# --------------------------------------------------------------------------------------------
# Plumbing

MAX_MSRS = 1024
MAX_CPUID_ENTRIES = 256
XSAVE_LEGACY_BYTES = 4096

cdef int _fail(const char *name, int err) except -1:
    raise KvmError(err, name.decode())


cdef long _io(int fd, unsigned long request, void *arg, const char *name) except? -1:
    """ioctl with a pointer argument, GIL released; raises KvmError on failure."""
    cdef long rc
    cdef int err = 0
    with nogil:
        rc = ioctl(fd, request, arg)
        if rc < 0:
            err = errno
    if rc < 0:
        _fail(name, err)
    return rc


cdef long _io_int(int fd, unsigned long request, unsigned long arg, const char *name) except? -1:
    """ioctl with an integer argument (passed in the same register as a pointer would be)."""
    return _io(fd, request, <void *>arg, name)


# --------------------------------------------------------------------------------------------
# /dev/kvm (system) ioctls

def get_api_version(int kvm_fd):
    """KVM_GET_API_VERSION on /dev/kvm: the API version (12 on every kernel since 2.6.22).

    Errnos: EBADF (not an open fd), ENOTTY (not /dev/kvm).
    """
    return _io_int(kvm_fd, KVM_GET_API_VERSION, 0, b"KVM_GET_API_VERSION")


def check_extension(int fd, unsigned int cap):
    """KVM_CHECK_EXTENSION on /dev/kvm or a VM: 0 if ``cap`` is absent, else a cap-specific value.

    On a VM fd (KVM_CAP_CHECK_EXTENSION_VM) the answer can depend on the VM (e.g. XSAVE2 size).
    Errnos: EBADF, ENOTTY.
    """
    return _io_int(fd, KVM_CHECK_EXTENSION, cap, b"KVM_CHECK_EXTENSION")


def get_vcpu_mmap_size(int kvm_fd):
    """KVM_GET_VCPU_MMAP_SIZE on /dev/kvm: bytes to mmap from a vCPU fd for ``kvm_run``.

    Errnos: EBADF, ENOTTY.
    """
    return _io_int(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0, b"KVM_GET_VCPU_MMAP_SIZE")


def get_msr_index_list(int kvm_fd):
    """KVM_GET_MSR_INDEX_LIST on /dev/kvm: the MSRs KVM saves and restores, as a list of ints.

    Errnos: EBADF, ENOTTY, E2BIG (more than MAX_MSRS, never seen in practice).
    """
    cdef kvm_msr_list *lst = <kvm_msr_list *>calloc(1, sizeof(kvm_msr_list) + 4 * MAX_MSRS)
    if lst == NULL:
        raise MemoryError()
    try:
        lst.nmsrs = MAX_MSRS
        _io(kvm_fd, KVM_GET_MSR_INDEX_LIST, lst, b"KVM_GET_MSR_INDEX_LIST")
        return [lst.indices[i] for i in range(lst.nmsrs)]
    finally:
        free(lst)


def get_supported_cpuid(int kvm_fd):
    """KVM_GET_SUPPORTED_CPUID on /dev/kvm (KVM_CAP_EXT_CPUID): the CPUID leaves KVM can expose.

    Returns tuples ``(function, index, flags, eax, ebx, ecx, edx)``.  Errnos: EBADF, ENOTTY,
    E2BIG (more than MAX_CPUID_ENTRIES leaves).
    """
    cdef kvm_cpuid2 *cp = <kvm_cpuid2 *>calloc(
        1, sizeof(kvm_cpuid2) + sizeof(kvm_cpuid_entry2) * MAX_CPUID_ENTRIES)
    if cp == NULL:
        raise MemoryError()
    try:
        cp.nent = MAX_CPUID_ENTRIES
        _io(kvm_fd, KVM_GET_SUPPORTED_CPUID, cp, b"KVM_GET_SUPPORTED_CPUID")
        return [(cp.entries[i].function, cp.entries[i].index, cp.entries[i].flags,
                 cp.entries[i].eax, cp.entries[i].ebx, cp.entries[i].ecx, cp.entries[i].edx)
                for i in range(cp.nent)]
    finally:
        free(cp)


def create_vm(int kvm_fd, unsigned long vm_type=0):
    """KVM_CREATE_VM on /dev/kvm: a new VM's file descriptor (the caller owns and closes it).

    Errnos: EBADF, ENOTTY, EINVAL (unknown type), ENOMEM, EMFILE.
    """
    return _io_int(kvm_fd, KVM_CREATE_VM, vm_type, b"KVM_CREATE_VM")


# --------------------------------------------------------------------------------------------
# VM ioctls

def enable_cap(int vm_fd, unsigned int cap, unsigned long long arg0=0):
    """KVM_ENABLE_CAP on a VM (KVM_CAP_ENABLE_CAP_VM): turn on ``cap`` with ``args[0] = arg0``.

    Used for KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.  Errnos: EBADF, ENOTTY, EINVAL (capability
    absent or argument not supported).
    """
    cdef kvm_enable_cap ec
    memset(&ec, 0, sizeof(ec))
    ec.cap = cap
    ec.args[0] = arg0
    _io(vm_fd, KVM_ENABLE_CAP, &ec, b"KVM_ENABLE_CAP")


def set_tss_addr(int vm_fd, unsigned long addr):
    """KVM_SET_TSS_ADDR on a VM (KVM_CAP_SET_TSS_ADDR): 3 pages of guest-physical space KVM may
    use for real-mode emulation on Intel; must not overlap RAM slots or MMIO.

    Errnos: EBADF, ENOTTY, EINVAL, EEXIST (already set).
    """
    _io_int(vm_fd, KVM_SET_TSS_ADDR, addr, b"KVM_SET_TSS_ADDR")


def create_irqchip(int vm_fd):
    """KVM_CREATE_IRQCHIP on a VM (KVM_CAP_IRQCHIP): in-kernel PIC, IOAPIC and local APICs.

    With it KVM handles HLT itself (the vCPU thread sleeps in KVM_RUN until an interrupt or a
    kick).  Must precede KVM_CREATE_VCPU.  Errnos: EBADF, ENOTTY, EEXIST, EINVAL (vCPUs exist).
    """
    _io_int(vm_fd, KVM_CREATE_IRQCHIP, 0, b"KVM_CREATE_IRQCHIP")


def _unsafe_set_user_memory_region(int vm_fd, unsigned int slot, unsigned int flags,
                                   unsigned long long guest_phys_addr,
                                   unsigned long long memory_size,
                                   unsigned long long userspace_addr):
    """KVM_SET_USER_MEMORY_REGION on a VM (KVM_CAP_USER_MEMORY): map host memory into the guest.

    ``memory_size == 0`` deletes the slot; ``flags`` may hold KVM_MEM_LOG_DIRTY_PAGES (1).

    Safety: ``userspace_addr`` must be the start of a mapping of at least ``memory_size`` bytes
    that stays mapped until the slot is deleted (or the VM closed).  KVM reads and writes it on
    the guest's behalf; unmapping it early turns guest accesses into KVM_RUN EFAULT errors and
    a later mapping at the same address would become guest RAM.  :class:`pymig.kvm.MemorySlot`
    keeps an export of the RamBlock's mmap for as long as the slot exists.

    Errnos: EBADF, ENOTTY, EINVAL (misaligned address/size, bad flags, slot id too large),
    EEXIST (overlaps another slot), EFAULT.
    """
    cdef kvm_userspace_memory_region reg
    reg.slot = slot
    reg.flags = flags
    reg.guest_phys_addr = guest_phys_addr
    reg.memory_size = memory_size
    reg.userspace_addr = userspace_addr
    _io(vm_fd, KVM_SET_USER_MEMORY_REGION, &reg, b"KVM_SET_USER_MEMORY_REGION")


def get_dirty_log(int vm_fd, unsigned int slot, unsigned long long[::1] bitmap not None):
    """KVM_GET_DIRTY_LOG on a VM: copy the slot's dirty bitmap into ``bitmap`` (uint64 words).

    ``bitmap`` must hold at least ceil(slot pages / 64) words (KVM writes exactly that many).
    Without manual protection KVM also clears its copy and write-protects the pages returned;
    with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled it only copies, and KVM_CLEAR_DIRTY_LOG
    re-protects.  Errnos: EBADF, ENOTTY, ENOENT (slot absent or not logging), EINVAL, EFAULT.
    """
    if bitmap.shape[0] == 0:
        raise ValueError("dirty bitmap is empty")
    cdef kvm_dirty_log log
    memset(&log, 0, sizeof(log))
    log.slot = slot
    log.dirty_bitmap = &bitmap[0]
    _io(vm_fd, KVM_GET_DIRTY_LOG, &log, b"KVM_GET_DIRTY_LOG")


def clear_dirty_log(int vm_fd, unsigned int slot, unsigned long long[::1] bitmap not None,
                    unsigned long long first_page, unsigned int num_pages):
    """KVM_CLEAR_DIRTY_LOG on a VM (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled): for pages
    [first_page, first_page + num_pages), clear the dirty bit and write-protect again every page
    whose bit is set in ``bitmap`` (bit 0 of word 0 = ``first_page``).

    ``first_page`` must be a multiple of 64 and ``num_pages`` too unless the range ends at the
    slot's end (KVM's rule; EINVAL otherwise).  ``bitmap`` must cover ``num_pages`` bits.
    Errnos: EBADF, ENOTTY, ENOENT (slot absent/not logging), EINVAL, EFAULT.
    """
    if num_pages == 0:
        return
    if <unsigned long long>bitmap.shape[0] * 64 < num_pages:
        raise ValueError(f"bitmap of {bitmap.shape[0]} words does not cover {num_pages} pages")
    cdef kvm_clear_dirty_log log
    memset(&log, 0, sizeof(log))
    log.slot = slot
    log.first_page = first_page
    log.num_pages = num_pages
    log.dirty_bitmap = &bitmap[0]
    _io(vm_fd, KVM_CLEAR_DIRTY_LOG, &log, b"KVM_CLEAR_DIRTY_LOG")


def reset_dirty_rings(int vm_fd):
    """KVM_RESET_DIRTY_RINGS on a VM (KVM_CAP_DIRTY_LOG_RING enabled): write-protect again the
    pages of every ring entry userspace marked RESET and recycle those entries; returns how
    many were reset.  Errnos: EBADF, ENOTTY, EINVAL (no dirty ring).
    """
    return _io_int(vm_fd, KVM_RESET_DIRTY_RINGS, 0, b"KVM_RESET_DIRTY_RINGS")


def harvest_dirty_ring(unsigned char[::1] ring not None, unsigned long long fetch,
                       long long[::1] slots not None, long long[::1] offsets not None):
    """Read a vCPU's mmap'd dirty ring (KVM_CAP_DIRTY_LOG_RING) from index ``fetch``: store
    each dirty entry's slot (``as_id << 16 | slot id``) and page offset, and mark the entry
    RESET for KVM_RESET_DIRTY_RINGS.  Returns ``(count, next fetch index)``; fewer than
    ``len(slots)`` entries means the ring is drained.  Not an ioctl: reads shared memory.
    """
    cdef unsigned int entries = ring.shape[0] // 16
    if entries == 0 or entries & (entries - 1):
        raise ValueError("a dirty ring holds a power of two of 16-byte entries")
    cdef long capacity = min(slots.shape[0], offsets.shape[0])
    cdef long n = 0
    if capacity == 0:
        return 0, fetch
    with nogil:
        n = pymig_harvest_ring(<kvm_dirty_gfn *>&ring[0], entries, &fetch, &slots[0],
                               &offsets[0], capacity)
    return n, fetch


def create_vcpu(int vm_fd, unsigned long vcpu_id):
    """KVM_CREATE_VCPU on a VM: a new vCPU's file descriptor (the caller owns and closes it).

    Errnos: EBADF, ENOTTY, EINVAL (id >= KVM_CAP_MAX_VCPU_ID), EEXIST (id in use), ENOMEM.
    """
    return _io_int(vm_fd, KVM_CREATE_VCPU, vcpu_id, b"KVM_CREATE_VCPU")


# --------------------------------------------------------------------------------------------
# vCPU ioctls

def run(int vcpu_fd):
    """KVM_RUN on a vCPU: enter the guest until an exit; returns 0, or ``EINTR`` when a kick
    (signal or ``immediate_exit``) ended the call before or during guest execution.

    The GIL is released for the whole call.  The exit is described by the vCPU's mmap'd
    ``kvm_run`` (see the ``run_*`` readers).  Errnos raised: EBADF, ENOTTY, EFAULT (guest
    memory unmapped), ENOEXEC (not yet runnable), EINVAL.  EAGAIN is returned like EINTR.
    """
    cdef int rc
    cdef int err = 0
    with nogil:
        rc = ioctl(vcpu_fd, KVM_RUN, 0)
        if rc < 0:
            err = errno
    if rc < 0:
        if err == EINTR or err == EAGAIN:
            return err
        _fail(b"KVM_RUN", err)
    return 0


def get_regs(int vcpu_fd):
    """KVM_GET_REGS on a vCPU: general registers as a dict (rax..r15, rip, rflags).

    Errnos: EBADF, ENOTTY.
    """
    cdef kvm_regs regs
    _io(vcpu_fd, KVM_GET_REGS, &regs, b"KVM_GET_REGS")
    return regs


def set_regs(int vcpu_fd, dict values not None):
    """KVM_SET_REGS on a vCPU from a dict with every key :func:`get_regs` returns.

    Errnos: EBADF, ENOTTY.
    """
    cdef kvm_regs regs = values
    _io(vcpu_fd, KVM_SET_REGS, &regs, b"KVM_SET_REGS")


def get_sregs(int vcpu_fd):
    """KVM_GET_SREGS on a vCPU: segments, descriptor tables, control registers, EFER, APIC base
    and the pending-interrupt bitmap, as a dict of dicts.  Errnos: EBADF, ENOTTY.
    """
    cdef kvm_sregs sregs
    _io(vcpu_fd, KVM_GET_SREGS, &sregs, b"KVM_GET_SREGS")
    return sregs


def set_sregs(int vcpu_fd, dict values not None):
    """KVM_SET_SREGS on a vCPU from a dict shaped like :func:`get_sregs`'s result.

    Errnos: EBADF, ENOTTY, EINVAL (inconsistent control registers or segments).
    """
    cdef kvm_sregs sregs = values
    _io(vcpu_fd, KVM_SET_SREGS, &sregs, b"KVM_SET_SREGS")


def get_xsave(int vcpu_fd, unsigned int size):
    """KVM_GET_XSAVE2 (``size`` > 4096, KVM_CAP_XSAVE2) or KVM_GET_XSAVE (KVM_CAP_XSAVE): the
    vCPU's FPU/SSE/AVX state in XSAVE layout, ``size`` bytes (the VM's KVM_CAP_XSAVE2 value).

    Errnos: EBADF, ENOTTY, EINVAL.
    """
    if size < XSAVE_LEGACY_BYTES:
        size = XSAVE_LEGACY_BYTES
    out = bytearray(size)
    cdef unsigned char[::1] view = out
    if size > XSAVE_LEGACY_BYTES:
        _io(vcpu_fd, KVM_GET_XSAVE2, &view[0], b"KVM_GET_XSAVE2")
    else:
        _io(vcpu_fd, KVM_GET_XSAVE, &view[0], b"KVM_GET_XSAVE")
    return bytes(out)


def set_xsave(int vcpu_fd, const unsigned char[::1] area not None, unsigned int size):
    """KVM_SET_XSAVE on a vCPU (KVM_CAP_XSAVE) from an area :func:`get_xsave` returned.

    KVM reads exactly the VM's XSAVE size (``size``: its KVM_CAP_XSAVE2 value, at least 4096)
    from the area, so an area of any other length is refused here: shorter, KVM would read
    past it; longer, it was not this VM's.
    Errnos: EBADF, ENOTTY, EINVAL (features the host does not support).
    """
    if size < XSAVE_LEGACY_BYTES:
        size = XSAVE_LEGACY_BYTES
    if <size_t>area.shape[0] != size:
        raise ValueError(f"XSAVE area of {area.shape[0]} bytes: this VM's XSAVE size is "
                         f"{size}")
    _io(vcpu_fd, KVM_SET_XSAVE, <void *>&area[0], b"KVM_SET_XSAVE")


def get_xcrs(int vcpu_fd):
    """KVM_GET_XCRS on a vCPU (KVM_CAP_XCRS): extended control registers as ``[(xcr, value)]``.

    Errnos: EBADF, ENOTTY.
    """
    cdef kvm_xcrs xcrs
    memset(&xcrs, 0, sizeof(xcrs))
    _io(vcpu_fd, KVM_GET_XCRS, &xcrs, b"KVM_GET_XCRS")
    return [(xcrs.xcrs[i].xcr, xcrs.xcrs[i].value) for i in range(min(xcrs.nr_xcrs, 16))]


def set_xcrs(int vcpu_fd, list pairs not None):
    """KVM_SET_XCRS on a vCPU (KVM_CAP_XCRS) from ``[(xcr, value)]``.

    Errnos: EBADF, ENOTTY, EINVAL (a value the host does not allow, e.g. XCR0 bits).
    """
    if len(pairs) > 16:
        raise ValueError("at most 16 XCRs")
    cdef kvm_xcrs xcrs
    memset(&xcrs, 0, sizeof(xcrs))
    xcrs.nr_xcrs = len(pairs)
    for i, (xcr, value) in enumerate(pairs):
        xcrs.xcrs[i].xcr = xcr
        xcrs.xcrs[i].value = value
    _io(vcpu_fd, KVM_SET_XCRS, &xcrs, b"KVM_SET_XCRS")


cdef kvm_msrs *_msr_buffer(list indices) except NULL:
    if len(indices) > MAX_MSRS:
        raise ValueError(f"at most {MAX_MSRS} MSRs per call")
    cdef kvm_msrs *msrs = <kvm_msrs *>calloc(
        1, sizeof(kvm_msrs) + sizeof(kvm_msr_entry) * len(indices))
    if msrs == NULL:
        raise MemoryError()
    msrs.nmsrs = len(indices)
    for i, index in enumerate(indices):
        msrs.entries[i].index = index
    return msrs


def get_msrs(int vcpu_fd, list indices not None):
    """KVM_GET_MSRS on a vCPU: values of ``indices``; stops at the first MSR KVM cannot read,
    so the list returned may be shorter than ``indices`` (its length is KVM's count).

    Errnos: EBADF, ENOTTY, E2BIG.
    """
    cdef kvm_msrs *msrs = _msr_buffer(indices)
    try:
        n = _io(vcpu_fd, KVM_GET_MSRS, msrs, b"KVM_GET_MSRS")
        return [msrs.entries[i].data for i in range(n)]
    finally:
        free(msrs)


def set_msrs(int vcpu_fd, list indices not None, list values not None):
    """KVM_SET_MSRS on a vCPU: returns how many MSRs KVM set (it stops at the first refusal).

    Errnos: EBADF, ENOTTY, E2BIG.
    """
    if len(values) != len(indices):
        raise ValueError("one value per MSR index")
    cdef kvm_msrs *msrs = _msr_buffer(indices)
    try:
        for i, value in enumerate(values):
            msrs.entries[i].data = value
        return _io(vcpu_fd, KVM_SET_MSRS, msrs, b"KVM_SET_MSRS")
    finally:
        free(msrs)


def get_lapic(int vcpu_fd):
    """KVM_GET_LAPIC on a vCPU (KVM_CAP_IRQCHIP, in-kernel irqchip created): the local APIC
    register page, 1024 bytes.  Errnos: EBADF, ENOTTY, ENXIO (no in-kernel irqchip).
    """
    cdef kvm_lapic_state lapic
    _io(vcpu_fd, KVM_GET_LAPIC, &lapic, b"KVM_GET_LAPIC")
    return (<char *>lapic.regs)[:1024]


def set_lapic(int vcpu_fd, const unsigned char[::1] regs not None):
    """KVM_SET_LAPIC on a vCPU (in-kernel irqchip) from 1024 bytes :func:`get_lapic` returned.

    Errnos: EBADF, ENOTTY, ENXIO, EINVAL.
    """
    if regs.shape[0] != 1024:
        raise ValueError(f"local APIC state is 1024 bytes, not {regs.shape[0]}")
    cdef kvm_lapic_state lapic
    memcpy(lapic.regs, &regs[0], 1024)
    _io(vcpu_fd, KVM_SET_LAPIC, &lapic, b"KVM_SET_LAPIC")


def get_mp_state(int vcpu_fd):
    """KVM_GET_MP_STATE on a vCPU (KVM_CAP_MP_STATE): RUNNABLE 0, UNINITIALIZED 1,
    INIT_RECEIVED 2, HALTED 3, SIPI_RECEIVED 4.  Errnos: EBADF, ENOTTY.
    """
    cdef kvm_mp_state mp
    _io(vcpu_fd, KVM_GET_MP_STATE, &mp, b"KVM_GET_MP_STATE")
    return mp.mp_state


def set_mp_state(int vcpu_fd, unsigned int state):
    """KVM_SET_MP_STATE on a vCPU (KVM_CAP_MP_STATE).  Errnos: EBADF, ENOTTY, EINVAL."""
    cdef kvm_mp_state mp
    mp.mp_state = state
    _io(vcpu_fd, KVM_SET_MP_STATE, &mp, b"KVM_SET_MP_STATE")


def get_vcpu_events(int vcpu_fd):
    """KVM_GET_VCPU_EVENTS on a vCPU (KVM_CAP_VCPU_EVENTS): pending/injected exception,
    interrupt, NMI and SMI state, as a flat dict.  Errnos: EBADF, ENOTTY.
    """
    cdef kvm_vcpu_events ev
    memset(&ev, 0, sizeof(ev))
    _io(vcpu_fd, KVM_GET_VCPU_EVENTS, &ev, b"KVM_GET_VCPU_EVENTS")
    return {
        "exception_injected": ev.exception.injected, "exception_nr": ev.exception.nr,
        "exception_has_error_code": ev.exception.has_error_code,
        "exception_pending": ev.exception.pending, "exception_error_code": ev.exception.error_code,
        "interrupt_injected": ev.interrupt.injected, "interrupt_nr": ev.interrupt.nr,
        "interrupt_soft": ev.interrupt.soft, "interrupt_shadow": ev.interrupt.shadow,
        "nmi_injected": ev.nmi.injected, "nmi_pending": ev.nmi.pending,
        "nmi_masked": ev.nmi.masked, "sipi_vector": ev.sipi_vector, "flags": ev.flags,
        "smi_smm": ev.smi.smm, "smi_pending": ev.smi.pending,
        "smi_inside_nmi": ev.smi.smm_inside_nmi, "smi_latched_init": ev.smi.latched_init,
        "triple_fault_pending": ev.triple_fault.pending,
        "exception_has_payload": ev.exception_has_payload,
        "exception_payload": ev.exception_payload,
    }


def set_vcpu_events(int vcpu_fd, dict v not None):
    """KVM_SET_VCPU_EVENTS on a vCPU from the dict :func:`get_vcpu_events` returns.

    ``flags`` says which optional parts KVM should take (NMI_PENDING, SIPI_VECTOR, SHADOW, SMM,
    PAYLOAD, TRIPLE_FAULT).  Errnos: EBADF, ENOTTY, EINVAL (flags KVM does not accept).
    """
    cdef kvm_vcpu_events ev
    memset(&ev, 0, sizeof(ev))
    ev.exception.injected = v["exception_injected"]
    ev.exception.nr = v["exception_nr"]
    ev.exception.has_error_code = v["exception_has_error_code"]
    ev.exception.pending = v["exception_pending"]
    ev.exception.error_code = v["exception_error_code"]
    ev.interrupt.injected = v["interrupt_injected"]
    ev.interrupt.nr = v["interrupt_nr"]
    ev.interrupt.soft = v["interrupt_soft"]
    ev.interrupt.shadow = v["interrupt_shadow"]
    ev.nmi.injected = v["nmi_injected"]
    ev.nmi.pending = v["nmi_pending"]
    ev.nmi.masked = v["nmi_masked"]
    ev.sipi_vector = v["sipi_vector"]
    ev.flags = v["flags"]
    ev.smi.smm = v["smi_smm"]
    ev.smi.pending = v["smi_pending"]
    ev.smi.smm_inside_nmi = v["smi_inside_nmi"]
    ev.smi.latched_init = v["smi_latched_init"]
    ev.triple_fault.pending = v["triple_fault_pending"]
    ev.exception_has_payload = v["exception_has_payload"]
    ev.exception_payload = v["exception_payload"]
    _io(vcpu_fd, KVM_SET_VCPU_EVENTS, &ev, b"KVM_SET_VCPU_EVENTS")


def get_debugregs(int vcpu_fd):
    """KVM_GET_DEBUGREGS on a vCPU (KVM_CAP_DEBUGREGS): ``{"db": [4], "dr6", "dr7", "flags"}``.

    Errnos: EBADF, ENOTTY.
    """
    cdef kvm_debugregs dr
    memset(&dr, 0, sizeof(dr))
    _io(vcpu_fd, KVM_GET_DEBUGREGS, &dr, b"KVM_GET_DEBUGREGS")
    return {"db": [dr.db[i] for i in range(4)], "dr6": dr.dr6, "dr7": dr.dr7, "flags": dr.flags}


def set_debugregs(int vcpu_fd, dict v not None):
    """KVM_SET_DEBUGREGS on a vCPU (KVM_CAP_DEBUGREGS).  Errnos: EBADF, ENOTTY, EINVAL."""
    cdef kvm_debugregs dr
    memset(&dr, 0, sizeof(dr))
    for i in range(4):
        dr.db[i] = v["db"][i]
    dr.dr6 = v["dr6"]
    dr.dr7 = v["dr7"]
    dr.flags = v["flags"]
    _io(vcpu_fd, KVM_SET_DEBUGREGS, &dr, b"KVM_SET_DEBUGREGS")


def get_tsc_khz(int vcpu_fd):
    """KVM_GET_TSC_KHZ on a vCPU (KVM_CAP_GET_TSC_KHZ): the guest TSC frequency in kHz.

    Errnos: EBADF, ENOTTY, EIO (frequency unknown).
    """
    return _io_int(vcpu_fd, KVM_GET_TSC_KHZ, 0, b"KVM_GET_TSC_KHZ")


def set_cpuid2(int vcpu_fd, list entries not None):
    """KVM_SET_CPUID2 on a vCPU (KVM_CAP_EXT_CPUID) from tuples
    ``(function, index, flags, eax, ebx, ecx, edx)`` (the shape of get_supported_cpuid's).

    Errnos: EBADF, ENOTTY, E2BIG, EINVAL, EFAULT.
    """
    if len(entries) > MAX_CPUID_ENTRIES:
        raise ValueError(f"at most {MAX_CPUID_ENTRIES} CPUID leaves")
    cdef kvm_cpuid2 *cp = <kvm_cpuid2 *>calloc(
        1, sizeof(kvm_cpuid2) + sizeof(kvm_cpuid_entry2) * len(entries))
    if cp == NULL:
        raise MemoryError()
    try:
        cp.nent = len(entries)
        for i, (function, index, flags, eax, ebx, ecx, edx) in enumerate(entries):
            cp.entries[i].function = function
            cp.entries[i].index = index
            cp.entries[i].flags = flags
            cp.entries[i].eax = eax
            cp.entries[i].ebx = ebx
            cp.entries[i].ecx = ecx
            cp.entries[i].edx = edx
        _io(vcpu_fd, KVM_SET_CPUID2, cp, b"KVM_SET_CPUID2")
    finally:
        free(cp)


# --------------------------------------------------------------------------------------------
# The mmap'd kvm_run area of a vCPU: readers and writers over a writable buffer

cdef kvm_run *_run_area(unsigned char[::1] area) except NULL:
    if <size_t>area.shape[0] < sizeof(kvm_run):
        raise ValueError(f"kvm_run area of {area.shape[0]} bytes is too small")
    return <kvm_run *>&area[0]


def run_exit_reason(unsigned char[::1] area not None):
    """``kvm_run.exit_reason`` (KVM_EXIT_*) after KVM_RUN returned 0."""
    return _run_area(area).exit_reason


def run_set_immediate_exit(unsigned char[::1] area not None, bint value):
    """Set ``kvm_run.immediate_exit`` (KVM_CAP_IMMEDIATE_EXIT): while 1, KVM_RUN returns EINTR
    at once instead of entering the guest."""
    _run_area(area).immediate_exit = value


def run_io(unsigned char[::1] area not None):
    """KVM_EXIT_IO: ``(direction, size, port, count, data_offset)``; the data is ``size * count``
    bytes at ``data_offset`` inside the same area (direction 0 = in, 1 = out)."""
    cdef kvm_run *run = _run_area(area)
    cdef unsigned long long end = run.io.data_offset
    end += <unsigned long long>run.io.size * run.io.count
    if end > <unsigned long long>area.shape[0]:
        raise ValueError("KVM_EXIT_IO data lies outside the kvm_run area")
    return run.io.direction, run.io.size, run.io.port, run.io.count, run.io.data_offset


def run_mmio(unsigned char[::1] area not None):
    """KVM_EXIT_MMIO: ``(phys_addr, data (8 bytes), len, is_write)``."""
    cdef kvm_run *run = _run_area(area)
    return (run.mmio.phys_addr, bytes(run.mmio.data[:8]), run.mmio.len, run.mmio.is_write)


def run_set_mmio_data(unsigned char[::1] area not None, const unsigned char[::1] data not None):
    """Fill ``kvm_run.mmio.data`` (up to 8 bytes) for an MMIO read before the next KVM_RUN."""
    cdef kvm_run *run = _run_area(area)
    if data.shape[0] > 8:
        raise ValueError("MMIO data is at most 8 bytes")
    if data.shape[0]:
        memcpy(run.mmio.data, &data[0], data.shape[0])


def run_fail_entry(unsigned char[::1] area not None):
    """KVM_EXIT_FAIL_ENTRY: ``(hardware_entry_failure_reason, cpu)``."""
    cdef kvm_run *run = _run_area(area)
    return run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu


def run_internal_error(unsigned char[::1] area not None):
    """KVM_EXIT_INTERNAL_ERROR: ``(suberror, [data...])`` (1 emulation, 2 simultaneous
    exceptions, 3 delivery event, 4 unexpected exit reason)."""
    cdef kvm_run *run = _run_area(area)
    n = min(run.internal.ndata, 16)
    return run.internal.suberror, [run.internal.data[i] for i in range(n)]


def run_hardware_exit_reason(unsigned char[::1] area not None):
    """KVM_EXIT_UNKNOWN: the hardware exit reason."""
    return _run_area(area).hw.hardware_exit_reason


def run_exception(unsigned char[::1] area not None):
    """KVM_EXIT_EXCEPTION: ``(exception, error_code)``."""
    cdef kvm_run *run = _run_area(area)
    return run.ex.exception, run.ex.error_code


def run_system_event(unsigned char[::1] area not None):
    """KVM_EXIT_SYSTEM_EVENT: the event type (1 shutdown, 2 reset, 3 crash, ...)."""
    return _run_area(area).system_event.type


# --------------------------------------------------------------------------------------------
# Kicking vCPU threads out of KVM_RUN

def kick_signal():
    """The real-time signal number used to kick vCPU threads (SIGRTMIN + 3)."""
    return pymig_kick_signal()


def install_kick_handler():
    """Install the no-op C handler (no SA_RESTART) for :func:`kick_signal`; idempotent."""
    cdef int rc = pymig_install_kick_handler()
    if rc < 0:
        raise OSError(-rc, "sigaction for the vCPU kick signal failed")


def unblock_kick_signal():
    """Make sure the calling thread can receive the kick signal (call from the vCPU thread)."""
    cdef int rc = pymig_unblock_kick()
    if rc < 0:
        raise OSError(-rc, "pthread_sigmask for the vCPU kick signal failed")


def thread_self():
    """``pthread_self()`` of the calling thread, for :func:`kick_thread`."""
    return pymig_thread_self()


def kick_thread(unsigned long tid):
    """``pthread_kill(tid, kick_signal())``.  The thread must still be alive (the caller's lock
    discipline guarantees it: a vCPU thread deregisters itself before it exits)."""
    cdef int rc = pymig_kick_thread(tid)
    if rc < 0:
        raise OSError(-rc, "pthread_kill of a vCPU thread failed")


# --------------------------------------------------------------------------------------------
# Parking a kicked vCPU without the GIL

cdef extern from *:
    """
    #include <limits.h>
    #include <linux/futex.h>
    #include <sys/syscall.h>
    #include <time.h>
    #include <unistd.h>

    /* What a vCPU thread and the threads pausing it share.  ``request`` is 1 while a pause is
     * asked for (set before the kick, withdrawn by resume or stop); ``parked`` is 1 while the
     * vCPU is out of guest mode and parked, in C or in the VMM's loop, or its thread has
     * ended.  Both are futex words.  ``in_c`` is 1 while the vCPU thread is inside
     * pymig_run_gated (it needs no GIL to park from there); ``changes``, a futex word too,
     * counts the parks and the returns from there.  The *_ns fields are the last pause's
     * timeline. */
    struct pymig_gate {
        int request;
        int parked;
        int in_c;
        int changes;
        int waiters;  /* requesters waiting on ``changes`` */
        int park_here;
        long long kicked_ns, exited_ns, parked_ns;
    };

    static long long pymig_now_ns(void)
    {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }

    static void pymig_futex_wake_all(int *word)
    {
        syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    }

    static void pymig_gate_request(struct pymig_gate *g, int on)
    {
        if (on)
            __atomic_store_n(&g->kicked_ns, pymig_now_ns(), __ATOMIC_RELAXED);
        __atomic_store_n(&g->request, on, __ATOMIC_SEQ_CST);
        if (!on)
            pymig_futex_wake_all(&g->request);
    }

    static void pymig_gate_set_parked(struct pymig_gate *g, int parked)
    {
        if (parked)
            __atomic_store_n(&g->parked_ns, pymig_now_ns(), __ATOMIC_RELAXED);
        __atomic_store_n(&g->parked, parked, __ATOMIC_SEQ_CST);
        if (parked) {
            pymig_futex_wake_all(&g->parked);
            __atomic_add_fetch(&g->changes, 1, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&g->waiters, __ATOMIC_SEQ_CST))
                pymig_futex_wake_all(&g->changes);
        }
    }

    /* Wait up to timeout_ns (< 0: for ever) for ``parked``; returns it. */
    static int pymig_gate_wait_parked(struct pymig_gate *g, long long timeout_ns)
    {
        long long deadline = timeout_ns < 0 ? 0 : pymig_now_ns() + timeout_ns;
        while (!__atomic_load_n(&g->parked, __ATOMIC_SEQ_CST)) {
            struct timespec rel, *relp = NULL;
            if (timeout_ns >= 0) {
                long long left = deadline - pymig_now_ns();
                if (left <= 0)
                    break;
                rel.tv_sec = left / 1000000000LL;
                rel.tv_nsec = left % 1000000000LL;
                relp = &rel;
            }
            syscall(SYS_futex, &g->parked, FUTEX_WAIT_PRIVATE, 0, relp, NULL, 0);
        }
        return __atomic_load_n(&g->parked, __ATOMIC_SEQ_CST);
    }

    /* The same, but only while the vCPU thread is inside pymig_run_gated: returns 1 once
     * parked, 0 as soon as the thread is back in the VMM (or the time is up). */
    static int pymig_gate_wait_parked_in_c(struct pymig_gate *g, long long timeout_ns)
    {
        long long deadline = pymig_now_ns() + timeout_ns;
        int parked;
        __atomic_add_fetch(&g->waiters, 1, __ATOMIC_SEQ_CST);
        for (;;) {
            struct timespec rel;
            int seen = __atomic_load_n(&g->changes, __ATOMIC_SEQ_CST);
            long long left = deadline - pymig_now_ns();
            parked = __atomic_load_n(&g->parked, __ATOMIC_SEQ_CST);
            if (parked || left <= 0 || !__atomic_load_n(&g->in_c, __ATOMIC_SEQ_CST))
                break;
            rel.tv_sec = left / 1000000000LL;
            rel.tv_nsec = left % 1000000000LL;
            syscall(SYS_futex, &g->changes, FUTEX_WAIT_PRIVATE, seen, &rel, NULL, 0);
        }
        __atomic_sub_fetch(&g->waiters, 1, __ATOMIC_SEQ_CST);
        return parked;
    }

    static void pymig_gate_leave_c(struct pymig_gate *g)
    {
        __atomic_store_n(&g->in_c, 0, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&g->changes, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&g->waiters, __ATOMIC_SEQ_CST))
            pymig_futex_wake_all(&g->changes);  /* a requester holding the GIL looks again */
    }

    /* One KVM_RUN.  When a kick ended it (EINTR/EAGAIN) and a pause is requested, the vCPU
     * parks right here, with no GIL, until the request is withdrawn; KVM has completed any
     * I/O the guest exited for before returning EINTR.  immediate_exit is cleared before the
     * request is read, as the kick protocol requires.  Returns 0 or -errno. */
    static int pymig_run_gated(int fd, struct kvm_run *run, struct pymig_gate *g)
    {
        int err;
        __atomic_store_n(&g->in_c, 1, __ATOMIC_SEQ_CST);
        if (ioctl(fd, KVM_RUN, 0) >= 0) {
            pymig_gate_leave_c(g);
            return 0;
        }
        err = errno;
        if (err != EINTR && err != EAGAIN) {
            pymig_gate_leave_c(g);
            return -err;
        }
        __atomic_store_n(&g->exited_ns, pymig_now_ns(), __ATOMIC_RELAXED);
        __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&g->park_here, __ATOMIC_RELAXED)
                && __atomic_load_n(&g->request, __ATOMIC_SEQ_CST)) {
            pymig_gate_set_parked(g, 1);
            while (__atomic_load_n(&g->request, __ATOMIC_SEQ_CST))
                syscall(SYS_futex, &g->request, FUTEX_WAIT_PRIVATE, 1, NULL, NULL, 0);
            __atomic_store_n(&g->parked, 0, __ATOMIC_SEQ_CST);
        }
        pymig_gate_leave_c(g);
        return -err;
    }
    """
    struct pymig_gate:
        int request
        int parked
        int in_c
        int changes
        int waiters
        int park_here
        long long kicked_ns
        long long exited_ns
        long long parked_ns
    void pymig_gate_request(pymig_gate *g, int on) nogil
    void pymig_gate_set_parked(pymig_gate *g, int parked) nogil
    int pymig_gate_wait_parked(pymig_gate *g, long long timeout_ns) nogil
    int pymig_gate_wait_parked_in_c(pymig_gate *g, long long timeout_ns) nogil
    int pymig_run_gated(int fd, kvm_run *run, pymig_gate *g) nogil


cdef class RunGate:
    """Where a vCPU thread parks on a pause without taking the GIL (see :func:`run_gated`).

    Requesters call :meth:`request` (under the vCPU thread's lock, before the kick) and
    :meth:`wait_parked`; the vCPU thread's own loop calls :meth:`set_parked` when it parks in
    Python instead (it was not in KVM_RUN when the pause came) and when its thread ends.
    """

    cdef pymig_gate g

    def __cinit__(self):
        memset(&self.g, 0, sizeof(self.g))
        self.g.park_here = 1

    def request(self, bint on):
        """Ask for a pause (True, before the kick) or withdraw it (False: resume, stop)."""
        pymig_gate_request(&self.g, on)

    def set_parked(self, bint parked):
        pymig_gate_set_parked(&self.g, parked)

    @property
    def parked(self):
        return bool(self.g.parked)

    @property
    def requested(self):
        return bool(self.g.request)

    @property
    def park_here(self):
        """False makes :func:`run_gated` return on every kick (the vCPU parks in Python)."""
        return bool(self.g.park_here)

    @park_here.setter
    def park_here(self, bint value):
        self.g.park_here = value

    def wait_parked(self, double timeout):
        """Wait (GIL released) up to ``timeout`` seconds (< 0: no limit) until parked."""
        cdef long long ns = -1 if timeout < 0 else <long long>(timeout * 1e9)
        cdef int parked
        with nogil:
            parked = pymig_gate_wait_parked(&self.g, ns)
        return bool(parked)

    def wait_parked_holding_gil(self, double timeout):
        """Wait up to ``timeout`` seconds *keeping the GIL* until parked, but only while the
        vCPU thread is inside :func:`run_gated`, where it parks without the GIL; returns
        False at once when it is in the VMM (it may need the GIL to get to its park).  The
        requester then has the GIL when the vCPU parks, instead of waiting for it a switch
        interval or more behind the process's busy threads; other threads wait meanwhile,
        so keep ``timeout`` short."""
        return bool(pymig_gate_wait_parked_in_c(&self.g, <long long>(max(timeout, 0.0) * 1e9)))

    def timeline(self):
        """``(kicked, exited, parked)`` CLOCK_MONOTONIC ns of the last pause request, the last
        KVM_RUN a kick ended and the last park: with exited > kicked, exited - kicked is the
        kernel and scheduler's share of a pause and parked - exited the VMM's."""
        return self.g.kicked_ns, self.g.exited_ns, self.g.parked_ns


def run_gated(int vcpu_fd, unsigned char[::1] area not None, RunGate gate not None):
    """KVM_RUN like :func:`run`, but a kick that finds a pause requested in ``gate`` parks the
    vCPU inside this call, GIL released, until the request is withdrawn; then returns EINTR.
    Clears ``kvm_run.immediate_exit`` after a kick.  Errnos raised as for :func:`run`."""
    cdef kvm_run *run = _run_area(area)
    cdef int rc
    with nogil:
        rc = pymig_run_gated(vcpu_fd, run, &gate.g)
    if rc == -EINTR or rc == -EAGAIN:
        return -rc
    if rc < 0:
        _fail(b"KVM_RUN", -rc)
    return 0


# --------------------------------------------------------------------------------------------
# Numbers from linux/kvm.h that callers need by name

cdef extern from "linux/kvm.h":
    const int KVM_CAP_IRQCHIP, KVM_CAP_USER_MEMORY, KVM_CAP_SET_TSS_ADDR, KVM_CAP_EXT_CPUID
    const int KVM_CAP_MP_STATE, KVM_CAP_VCPU_EVENTS, KVM_CAP_DEBUGREGS, KVM_CAP_XSAVE
    const int KVM_CAP_XCRS, KVM_CAP_XSAVE2, KVM_CAP_IMMEDIATE_EXIT, KVM_CAP_GET_TSC_KHZ
    const int KVM_CAP_TSC_CONTROL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_DIRTY_LOG_RING
    const int KVM_CAP_NR_VCPUS, KVM_CAP_MAX_VCPUS, KVM_CAP_NR_MEMSLOTS, KVM_CAP_SYNC_REGS
    const int KVM_CAP_ADJUST_CLOCK, KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_X86_SMM
    const int KVM_MEM_LOG_DIRTY_PAGES, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    const int KVM_DIRTY_LOG_INITIALLY_SET
    const int KVM_EXIT_UNKNOWN, KVM_EXIT_EXCEPTION, KVM_EXIT_IO, KVM_EXIT_HYPERCALL
    const int KVM_EXIT_DEBUG, KVM_EXIT_HLT, KVM_EXIT_MMIO, KVM_EXIT_IRQ_WINDOW_OPEN
    const int KVM_EXIT_SHUTDOWN, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_INTR, KVM_EXIT_INTERNAL_ERROR
    const int KVM_EXIT_SYSTEM_EVENT, KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT
    const int KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_HALTED
    const int KVM_EXIT_DIRTY_RING_FULL, KVM_DIRTY_LOG_PAGE_OFFSET

CAPS = {
    "KVM_CAP_IRQCHIP": KVM_CAP_IRQCHIP, "KVM_CAP_USER_MEMORY": KVM_CAP_USER_MEMORY,
    "KVM_CAP_SET_TSS_ADDR": KVM_CAP_SET_TSS_ADDR, "KVM_CAP_EXT_CPUID": KVM_CAP_EXT_CPUID,
    "KVM_CAP_MP_STATE": KVM_CAP_MP_STATE, "KVM_CAP_VCPU_EVENTS": KVM_CAP_VCPU_EVENTS,
    "KVM_CAP_DEBUGREGS": KVM_CAP_DEBUGREGS, "KVM_CAP_XSAVE": KVM_CAP_XSAVE,
    "KVM_CAP_XCRS": KVM_CAP_XCRS, "KVM_CAP_XSAVE2": KVM_CAP_XSAVE2,
    "KVM_CAP_IMMEDIATE_EXIT": KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_GET_TSC_KHZ": KVM_CAP_GET_TSC_KHZ,
    "KVM_CAP_TSC_CONTROL": KVM_CAP_TSC_CONTROL,
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2": KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    "KVM_CAP_DIRTY_LOG_RING": KVM_CAP_DIRTY_LOG_RING, "KVM_CAP_NR_VCPUS": KVM_CAP_NR_VCPUS,
    "KVM_CAP_MAX_VCPUS": KVM_CAP_MAX_VCPUS, "KVM_CAP_NR_MEMSLOTS": KVM_CAP_NR_MEMSLOTS,
    "KVM_CAP_SYNC_REGS": KVM_CAP_SYNC_REGS, "KVM_CAP_ADJUST_CLOCK": KVM_CAP_ADJUST_CLOCK,
    "KVM_CAP_SPLIT_IRQCHIP": KVM_CAP_SPLIT_IRQCHIP, "KVM_CAP_X86_SMM": KVM_CAP_X86_SMM,
}
MEM_LOG_DIRTY_PAGES = KVM_MEM_LOG_DIRTY_PAGES
DIRTY_LOG_MANUAL_PROTECT_ENABLE = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
DIRTY_LOG_INITIALLY_SET = KVM_DIRTY_LOG_INITIALLY_SET
EXIT_REASONS = {
    KVM_EXIT_UNKNOWN: "UNKNOWN", KVM_EXIT_EXCEPTION: "EXCEPTION", KVM_EXIT_IO: "IO",
    KVM_EXIT_HYPERCALL: "HYPERCALL", KVM_EXIT_DEBUG: "DEBUG", KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO", KVM_EXIT_IRQ_WINDOW_OPEN: "IRQ_WINDOW_OPEN",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN", KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY", KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR", KVM_EXIT_SYSTEM_EVENT: "SYSTEM_EVENT",
    KVM_EXIT_DIRTY_RING_FULL: "DIRTY_RING_FULL",
}
EXIT_IO_IN = KVM_EXIT_IO_IN
EXIT_IO_OUT = KVM_EXIT_IO_OUT
MP_STATE_RUNNABLE = KVM_MP_STATE_RUNNABLE
MP_STATE_UNINITIALIZED = KVM_MP_STATE_UNINITIALIZED
MP_STATE_HALTED = KVM_MP_STATE_HALTED
EXIT_UNKNOWN = KVM_EXIT_UNKNOWN
EXIT_EXCEPTION = KVM_EXIT_EXCEPTION
EXIT_IO = KVM_EXIT_IO
EXIT_HLT = KVM_EXIT_HLT
EXIT_MMIO = KVM_EXIT_MMIO
EXIT_SHUTDOWN = KVM_EXIT_SHUTDOWN
EXIT_FAIL_ENTRY = KVM_EXIT_FAIL_ENTRY
EXIT_INTR = KVM_EXIT_INTR
EXIT_INTERNAL_ERROR = KVM_EXIT_INTERNAL_ERROR
EXIT_SYSTEM_EVENT = KVM_EXIT_SYSTEM_EVENT
EXIT_DIRTY_RING_FULL = KVM_EXIT_DIRTY_RING_FULL
DIRTY_LOG_PAGE_OFFSET = KVM_DIRTY_LOG_PAGE_OFFSET
DIRTY_GFN_BYTES = 16


# --------------------------------------------------------------------------------------------
# userfaultfd (post-copy): the destination's guest RAM faults to a handler thread, which
# places each page once it has arrived; (background snapshots) a write to a write-protected
# page of the source's RAM faults to a thread that saves the page before it lets the write
# through.  The same module as KVM's ioctls: one place calls ioctl, whatever the device.

cdef extern from *:
    """
    #include <unistd.h>
    #include <sys/syscall.h>
    #include <linux/userfaultfd.h>

    /* The fault message the handler thread parses with struct (pymig.postcopy). */
    _Static_assert(sizeof(struct uffd_msg) == 32, "uffd_msg size");
    _Static_assert(offsetof(struct uffd_msg, arg.pagefault.flags) == 8, "uffd_msg flags");
    _Static_assert(offsetof(struct uffd_msg, arg.pagefault.address) == 16, "uffd_msg address");
    _Static_assert(offsetof(struct uffd_msg, arg.pagefault.feat.ptid) == 24, "uffd_msg ptid");
    _Static_assert(sizeof(struct uffdio_copy) == 40, "uffdio_copy");
    _Static_assert(sizeof(struct uffdio_writeprotect) == 24, "uffdio_writeprotect");

    static long pymig_userfaultfd(int flags) { return syscall(__NR_userfaultfd, flags); }
    """
    long pymig_userfaultfd(int flags) nogil
    const unsigned long long UFFD_API
    const unsigned long long UFFD_FEATURE_THREAD_ID
    const unsigned long long UFFDIO_REGISTER_MODE_MISSING
    const unsigned long long UFFDIO_REGISTER_MODE_WP
    const unsigned long long UFFD_FEATURE_PAGEFAULT_FLAG_WP
    const unsigned long long UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    const unsigned long long UFFD_PAGEFAULT_FLAG_WP
    const unsigned long long UFFDIO_WRITEPROTECT_MODE_WP
    const unsigned long long UFFDIO_WRITEPROTECT_MODE_DONTWAKE
    const unsigned long long UFFDIO_COPY_MODE_DONTWAKE
    const int UFFD_EVENT_PAGEFAULT
    const unsigned long long UFFD_PAGEFAULT_FLAG_WRITE
    const unsigned long UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_COPY
    const unsigned long UFFDIO_ZEROPAGE, UFFDIO_WAKE, UFFDIO_WRITEPROTECT
    struct c_uffdio_api "uffdio_api":
        unsigned long long api
        unsigned long long features
        unsigned long long ioctls
    struct c_uffdio_range "uffdio_range":
        unsigned long long start
        unsigned long long len
    struct c_uffdio_register "uffdio_register":
        c_uffdio_range range
        unsigned long long mode
        unsigned long long ioctls
    struct c_uffdio_copy "uffdio_copy":
        unsigned long long dst
        unsigned long long src
        unsigned long long len
        unsigned long long mode
        long long copy
    struct c_uffdio_zeropage "uffdio_zeropage":
        c_uffdio_range range
        unsigned long long mode
        long long zeropage
    struct c_uffdio_writeprotect "uffdio_writeprotect":
        c_uffdio_range range
        unsigned long long mode

from libc.errno cimport EEXIST

FEATURE_THREAD_ID = UFFD_FEATURE_THREAD_ID
REGISTER_MODE_MISSING = UFFDIO_REGISTER_MODE_MISSING
COPY_MODE_DONTWAKE = UFFDIO_COPY_MODE_DONTWAKE
EVENT_PAGEFAULT = UFFD_EVENT_PAGEFAULT
PAGEFAULT_FLAG_WRITE = UFFD_PAGEFAULT_FLAG_WRITE
REGISTER_MODE_WP = UFFDIO_REGISTER_MODE_WP
FEATURE_PAGEFAULT_FLAG_WP = UFFD_FEATURE_PAGEFAULT_FLAG_WP
FEATURE_WP_HUGETLBFS_SHMEM = UFFD_FEATURE_WP_HUGETLBFS_SHMEM
PAGEFAULT_FLAG_WP = UFFD_PAGEFAULT_FLAG_WP
WRITEPROTECT_MODE_WP = UFFDIO_WRITEPROTECT_MODE_WP
WRITEPROTECT_MODE_DONTWAKE = UFFDIO_WRITEPROTECT_MODE_DONTWAKE
UFFD_MSG_BYTES = 32


def userfaultfd_open(int flags):
    """The userfaultfd(2) system call: a new userfaultfd (``flags``: O_CLOEXEC, O_NONBLOCK).

    Not an ioctl, but the start of every one below.  Errnos: EPERM (unprivileged and
    vm.unprivileged_userfaultfd 0), ENOSYS (a kernel without it), EMFILE, ENOMEM."""
    cdef long fd = pymig_userfaultfd(flags)
    if fd < 0:
        _fail(b"userfaultfd", errno)
    return fd


def uffdio_api(int uffd, unsigned long long features):
    """UFFDIO_API on a new userfaultfd: the API handshake, asking for ``features`` (e.g.
    :data:`FEATURE_THREAD_ID`); returns (the features the kernel offers, the ioctls bitmask).
    Must be the first ioctl on the fd.  Errnos: EBADF, EINVAL (a feature the kernel lacks,
    or a second handshake), EFAULT."""
    cdef c_uffdio_api api
    api.api = UFFD_API
    api.features = features
    api.ioctls = 0
    _io(uffd, UFFDIO_API, &api, b"UFFDIO_API")
    return api.features, api.ioctls


def _unsafe_uffdio_register(int uffd, unsigned long long start, unsigned long long length,
                            unsigned long long mode):
    """UFFDIO_REGISTER: faults of ``mode`` (:data:`REGISTER_MODE_MISSING`,
    :data:`REGISTER_MODE_WP`, or both) on
    [start, start + length) go to the userfaultfd; returns the ioctls the range supports.

    Safety: the range must be a mapping the caller owns (guest RAM) for as long as it is
    registered; every thread touching a missing page there blocks until the handler places
    it, so a handler that does not run hangs them (closing the fd releases them, with the
    pages zero-filled).  Errnos: EBADF, EINVAL (unaligned, a mapping that cannot be
    registered), EBUSY (registered with another userfaultfd), ENOMEM, EPERM."""
    cdef c_uffdio_register reg
    reg.range.start = start
    reg.range.len = length
    reg.mode = mode
    reg.ioctls = 0
    _io(uffd, UFFDIO_REGISTER, &reg, b"UFFDIO_REGISTER")
    return reg.ioctls


def _unsafe_uffdio_unregister(int uffd, unsigned long long start, unsigned long long length):
    """UFFDIO_UNREGISTER: [start, start + length) faults as ordinary memory again (missing
    pages zero-filled).  Safety: as for :func:`_unsafe_uffdio_register`.  Errnos: EBADF,
    EINVAL, ENOMEM."""
    cdef c_uffdio_range rng
    rng.start = start
    rng.len = length
    _io(uffd, UFFDIO_UNREGISTER, &rng, b"UFFDIO_UNREGISTER")


def _unsafe_uffdio_copy(int uffd, unsigned long long dst, unsigned long long src,
                        unsigned long long length, unsigned long long mode=0):
    """UFFDIO_COPY: place ``length`` bytes from ``src`` at ``dst`` (whole pages of a
    registered range) atomically, and wake the threads waiting on them (unless ``mode`` has
    :data:`COPY_MODE_DONTWAKE`).  Returns (bytes placed, 0) or, when it stopped at a page
    already there, (bytes placed before it, EEXIST): a page is placed once, and the caller
    skips it; or (bytes placed, EAGAIN) when it stopped early (at a page already there, or
    the mapping changing): the caller goes on from there.

    Safety: ``src`` must be ``length`` readable bytes the caller owns; ``dst`` inside a range
    registered on ``uffd``.  Errnos (raised): EBADF, EINVAL, EFAULT, ENOENT (the mapping
    changed), ENOSPC (the faulting process exited)."""
    cdef c_uffdio_copy cp
    cdef long rc
    cdef int err = 0
    cp.dst = dst
    cp.src = src
    cp.len = length
    cp.mode = mode
    cp.copy = 0
    with nogil:
        rc = ioctl(uffd, UFFDIO_COPY, &cp)
        if rc < 0:
            err = errno
    if rc < 0:
        if err == EEXIST or err == EAGAIN:
            return (cp.copy if cp.copy > 0 else 0), err
        _fail(b"UFFDIO_COPY", err)
    return cp.copy, 0


def _unsafe_uffdio_zeropage(int uffd, unsigned long long start, unsigned long long length):
    """UFFDIO_ZEROPAGE: map zero pages on [start, start + length) of a registered anonymous
    range and wake the threads waiting there.  Returns as :func:`_unsafe_uffdio_copy` does.
    Safety: as for UFFDIO_COPY's ``dst``.  Errnos (raised): EBADF, EINVAL (shmem: use
    UFFDIO_COPY of zeros), EFAULT, ENOENT, ENOSPC."""
    cdef c_uffdio_zeropage zp
    cdef long rc
    cdef int err = 0
    zp.range.start = start
    zp.range.len = length
    zp.mode = 0
    zp.zeropage = 0
    with nogil:
        rc = ioctl(uffd, UFFDIO_ZEROPAGE, &zp)
        if rc < 0:
            err = errno
    if rc < 0:
        if err == EEXIST or err == EAGAIN:
            return (zp.zeropage if zp.zeropage > 0 else 0), err
        _fail(b"UFFDIO_ZEROPAGE", err)
    return zp.zeropage, 0


def _unsafe_uffdio_wake(int uffd, unsigned long long start, unsigned long long length):
    """UFFDIO_WAKE: wake the threads waiting on [start, start + length) (a page another path
    placed meanwhile).  Safety: as for UFFDIO_COPY's ``dst``.  Errnos: EBADF, EINVAL."""
    cdef c_uffdio_range rng
    rng.start = start
    rng.len = length
    _io(uffd, UFFDIO_WAKE, &rng, b"UFFDIO_WAKE")


def _unsafe_uffdio_writeprotect(int uffd, unsigned long long start, unsigned long long length,
                                unsigned long long mode):
    """UFFDIO_WRITEPROTECT: with ``mode`` :data:`WRITEPROTECT_MODE_WP`, a write to a page of
    [start, start + length) faults to the userfaultfd (a WRITE|WP fault) until the range is
    un-protected; with ``mode`` 0, un-protect it and wake the threads waiting there (unless
    :data:`WRITEPROTECT_MODE_DONTWAKE`).  KVM drops its writable mappings of a range protected
    here, so a vCPU's write faults too.

    Safety: the range must be registered on ``uffd`` with :data:`REGISTER_MODE_WP`; a thread
    writing a protected page blocks until the handler un-protects it (closing the fd releases
    it).  Errnos: EBADF, EINVAL (unaligned, a mode not allowed), ENOENT (a range not
    registered for write protection), EAGAIN (the mapping changing: retry), EFAULT."""
    cdef c_uffdio_writeprotect wp
    cdef long rc
    cdef int err = 0
    wp.range.start = start
    wp.range.len = length
    wp.mode = mode
    with nogil:
        rc = ioctl(uffd, UFFDIO_WRITEPROTECT, &wp)
        if rc < 0:
            err = errno
    if rc < 0:
        _fail(b"UFFDIO_WRITEPROTECT", err)
