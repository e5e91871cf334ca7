# Shared definitions of pymig's built-in guest workloads (GNU as, Intel syntax, 64-bit); included
# by each workload, never assembled on its own (hence the leading underscore).  What the
# workloads do and what every parameter-block and mailbox field means is defined once, for this
# guest and the simulated one, in pymig/guest/workloads.py; this file is its KVM implementation.
#
# kvm_pvm runs only 64-bit user-mode (CPL 3) guest code natively; everything else goes
# through KVM's instruction emulator at ~2 M instructions/s (docs/vmm.md).  So the host enters
# the workloads (dirtier, selfcheck, compute) in long mode at CPL 3: identity-mapped 2 MiB pages
# (user, writable, accessed+dirty preset so KVM never writes the page tables), interrupts off,
# at the load address 0x8000 with RSI = vCPU index and RSP = that vCPU's stack.  There is no
# hlt at CPL 3, so the workloads talk to the VMM through the control MMIO page (an unbacked
# guest-physical page: every access exits to the VMM), which costs what a port exit costs.
# Everything a workload keeps lives in registers or guest RAM, so pausing it at any
# instruction, migrating it and resuming it elsewhere continues it exactly.
#
# Guest-physical memory map (see docs/vmm.md):
#   0x1000 GDT, 0x1800 TSS       written by the host
#   0x2000-0x3fff                stacks, 1 KiB per vCPU (top = 0x2400 + 0x400*i)
#   0x5000 parameter block        written by the host before start (layout below)
#   0x6000 + 64*i mailbox         per-vCPU progress record (workloads.py: passes, pages_written,
#                                 errors, result, done, reserved; u64 each)
#   0x7000 + 64*i locals          per-vCPU private variables (RBP points here)
#   0x8000 code
#   0x10000 page tables           PML4, PDPT, then one page directory per GiB
#   0x100000 working set / compute region
#   0xfeb00000 control MMIO page  (not RAM)

.intel_syntax noprefix
.code64

# Parameter block (host-written, read-only for the guest).
.equ P_MAGIC,         0x5000   # u32 'PMIG'
.equ P_VERSION,       0x5004   # u32 1
.equ P_WORKLOAD,      0x5008   # u32 1 idle, 2 dirtier, 3 selfcheck, 4 compute
.equ P_VCPUS,         0x500c   # u32
.equ P_PATTERN,       0x5010   # u32 0 uniform, 1 sequential, 2 hotspot
.equ P_HOT_SHARE,     0x5014   # u32 share of writes to the hot part, x 2^32
.equ P_BATCH,         0x5018   # u32 pages per pacing batch, even split (vCPUs use SH_BATCH)
.equ P_ROUNDS,        0x501c   # u32 compute rounds
.equ P_TSC_PER_BATCH, 0x5020   # u64 TSC ticks per batch, even split (SH_TSC_PER_BATCH)
.equ P_MAX_LAG,       0x5028   # u64 TSC ticks of lag after which pacing stops catching up
.equ P_TSC_PER_US,    0x5030   # u32 TSC ticks per microsecond (>= 1)
.equ P_DISK_BLOCKS,   0x5034   # u32 diskcheck: 4 KiB blocks in its working set on the disk
# Per-vCPU share table at 0x5040 + 64*i; addressed from RBP (= 0x7000 + 64*i).
.equ SH_BASE,   -0x1fc0        # u32 guest-physical address of the share's first page
.equ SH_NPAGES, -0x1fbc        # u32 pages in the share (>= 1)
.equ SH_HOT,    -0x1fb8        # u32 pages in the hot part (hotspot: 1 <= hot < npages)
.equ SH_SEED,   -0x1fb0        # u64 compute: xorshift64 seed of this share
.equ SH_BATCH,  -0x1fa8        # u32 this vCPU's pages per pacing batch (>= 1)
.equ SH_TSC_PER_BATCH, -0x1fa0 # u64 this vCPU's TSC ticks per batch; 0 = as fast as it can
# Mailbox record at 0x6000 + 64*i (workloads.py), from RBP.
.equ MB_PASSES,  -0x1000
.equ MB_WRITTEN, -0x0ff8
.equ MB_ERRORS,  -0x0ff0
.equ MB_RESULT,  -0x0fe8
.equ MB_DONE,    -0x0fe0
# Locals at 0x7000 + 64*i, from RBP.
.equ L_DEADLINE, 0             # u64 TSC deadline of the current batch
.equ L_RNG,      8             # u64 xorshift64 state
.equ L_CURSOR,   16            # u64 next page (sequential) / page being stamped
.equ L_COUNT,    24            # u64 writes in the current pass
.equ L_PASS,     32            # u64 pass being stamped (selfcheck)
.equ L_BATCH,    40            # u32 pages left in the current batch

# Control MMIO page (docs/vmm.md); R15 holds its address in every workload.
.equ CONTROL_MMIO, 0xfeb00000
.equ CTL_EVENT,    0x0         # write u32: (argument << 8) | event
.equ CTL_PACE,     0x8         # write u32: microseconds the VMM may let this vCPU sleep
.equ CTL_HALT,     0x10        # write: park this vCPU until the VMM pauses it (CPL 3 "hlt")
.equ CONTROL_PORT, 0x510     # the same events as port I/O, for CPL 0 code (diskcheck)
.equ EV_PASS,      1
.equ EV_DONE,      2
.equ EV_ERROR,     3

.equ SLEEP_MIN_US,   200       # shorter waits spin (a host sleep overshoots ~50-100 us)
.equ SLEEP_SLACK_US, 100
.equ SLEEP_MAX_US,   20000

# Entry: RBP = locals, R15 = control page, RNG seeded per vCPU, pacing deadline = now.
.macro WORKLOAD_ENTRY
    mov rbp, rsi
    shl rbp, 6
    add rbp, 0x7000
    mov r15, CONTROL_MMIO
    lea rax, [rsi + 1]
    movabs rcx, 0x9e3779b97f4a7c15
    imul rax, rcx
    or rax, 1
    mov qword ptr [rbp + L_RNG], rax
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov qword ptr [rbp + L_DEADLINE], rax
    mov eax, dword ptr [rbp + SH_BATCH]
    mov dword ptr [rbp + L_BATCH], eax
.endm

# Count one written page, and pace once per batch.
.macro PAGE_DONE
    inc qword ptr [rbp + MB_WRITTEN]
    dec dword ptr [rbp + L_BATCH]
    jnz .Lpage_done\@
    call pace
.Lpage_done\@:
.endm

# reg = xorshift64(reg) (13, 7, 17); clobbers tmp.
.macro XORSHIFT64 reg, tmp
    mov \tmp, \reg
    shl \tmp, 13
    xor \reg, \tmp
    mov \tmp, \reg
    shr \tmp, 7
    xor \reg, \tmp
    mov \tmp, \reg
    shl \tmp, 17
    xor \reg, \tmp
.endm

.macro EVENT code
    mov dword ptr [r15 + CTL_EVENT], \code
.endm

# Park forever: each write to CTL_HALT parks the vCPU thread in the VMM until a pause; after a
# resume (here or on a destination) the loop parks it again.
.macro HALT_FOREVER
.Lhalt\@:
    mov dword ptr [r15 + CTL_HALT], 0
    jmp .Lhalt\@
.endm
