# idle: touches no memory after start; halts with interrupts off (a real HLT: the host enters
# this one in 32-bit protected mode at CPL 0, where HLT is allowed; emulation cost is moot for
# two instructions) and the vCPU sleeps in KVM_RUN.
.intel_syntax noprefix
.code32
.global start
start:
    cli
1:
    hlt
    jmp 1b
