# Subroutines shared by the workloads (included after each workload's main code).

# pace: wait until the current batch's deadline, then start the next batch.
# Keeps the average rate exact (deadline += ticks per batch); when the vCPU lags by more than
# P_MAX_LAG (it was paused, throttled or descheduled) the deadline restarts from now instead of
# bursting to catch up.  Long waits become a sleep request (CTL_PACE) so the host core idles.
# Preserves every register but the flags.
pace:
    push rax
    push rcx
    push rdx
    push r8
    mov eax, dword ptr [rbp + SH_BATCH]
    mov dword ptr [rbp + L_BATCH], eax
    mov rax, qword ptr [rbp + SH_TSC_PER_BATCH]
    test rax, rax
    jz .Lpace_done
    add qword ptr [rbp + L_DEADLINE], rax
.Lpace_wait:
    rdtsc
    shl rdx, 32
    or rax, rdx                      # rax = now
    mov rcx, qword ptr [rbp + L_DEADLINE]
    sub rcx, rax                     # rcx = deadline - now
    js .Lpace_behind
    mov rax, rcx
    xor edx, edx
    mov r8d, dword ptr [P_TSC_PER_US]
    div r8                           # rax = microseconds ahead
    cmp rax, SLEEP_MIN_US
    jb .Lpace_spin
    sub rax, SLEEP_SLACK_US
    cmp rax, SLEEP_MAX_US
    jbe .Lpace_sleep
    mov eax, SLEEP_MAX_US
.Lpace_sleep:
    mov dword ptr [r15 + CTL_PACE], eax
    jmp .Lpace_wait
.Lpace_spin:
    pause
    jmp .Lpace_wait
.Lpace_behind:
    neg rcx                          # rcx = now - deadline
    cmp rcx, qword ptr [P_MAX_LAG]
    jbe .Lpace_done
    add rcx, qword ptr [rbp + L_DEADLINE]
    mov qword ptr [rbp + L_DEADLINE], rcx
.Lpace_done:
    pop r8
    pop rdx
    pop rcx
    pop rax
    ret

# rand: RAX = next xorshift64 value of this vCPU's generator; clobbers RDX.
rand:
    mov rax, qword ptr [rbp + L_RNG]
    XORSHIFT64 rax, rdx
    mov qword ptr [rbp + L_RNG], rax
    ret

# rand_below: RAX = integer in [0, RCX) (RCX >= 1); clobbers RDX.
rand_below:
    call rand
    mul rcx                          # rdx = floor(rand * rcx / 2^64)
    mov rax, rdx
    ret
