# dirtier (defined in pymig/guest/workloads.py): increments the first byte of pages of this
# vCPU's share of the working set, at the paced rate, choosing pages uniformly, sequentially or
# with a hot spot (the first SH_HOT pages of the share take P_HOT_SHARE of the writes).
# passes += 1 every SH_NPAGES writes.
.include "_defs.S"
.global start
start:
    WORKLOAD_ENTRY
    mov qword ptr [rbp + L_CURSOR], 0
    mov qword ptr [rbp + L_COUNT], 0
next_page:
    mov eax, dword ptr [P_PATTERN]
    cmp eax, 1
    je sequential
    cmp eax, 2
    je hotspot
uniform:
    mov ecx, dword ptr [rbp + SH_NPAGES]
    call rand_below
    jmp write
sequential:
    mov rax, qword ptr [rbp + L_CURSOR]
    lea rdx, [rax + 1]
    mov ecx, dword ptr [rbp + SH_NPAGES]
    cmp rdx, rcx
    jb 1f
    xor edx, edx
1:
    mov qword ptr [rbp + L_CURSOR], rdx
    jmp write
hotspot:
    call rand
    shr rax, 32
    cmp eax, dword ptr [P_HOT_SHARE]
    jae cold
    mov ecx, dword ptr [rbp + SH_HOT]
    call rand_below
    jmp write
cold:
    mov ecx, dword ptr [rbp + SH_NPAGES]
    sub ecx, dword ptr [rbp + SH_HOT]
    call rand_below
    mov ecx, dword ptr [rbp + SH_HOT]
    add rax, rcx
write:
    shl rax, 12
    mov ecx, dword ptr [rbp + SH_BASE]
    inc byte ptr [rax + rcx]
    mov rax, qword ptr [rbp + L_COUNT]
    inc rax
    mov ecx, dword ptr [rbp + SH_NPAGES]
    cmp rax, rcx
    jb 2f
    xor eax, eax
    inc qword ptr [rbp + MB_PASSES]
2:
    mov qword ptr [rbp + L_COUNT], rax
    PAGE_DONE
    jmp next_page

.include "_lib.S"
