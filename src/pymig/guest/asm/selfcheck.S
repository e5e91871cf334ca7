# selfcheck (defined in pymig/guest/workloads.py): stamps every page of this vCPU's share, in
# order, with the pass number p:
#   u64 p at offset 0, u64 page-frame number at offset 8, u64 p at offset 4088.
# Before stamping, it checks the page still holds pass p-1 (pass 0 = all zero: frame 0 too)
# and counts each mismatching page in errors (the first one also raises EV_ERROR).
# Store order: the tail word first, then offsets 0-15 in one 16-byte store, so a page whose
# head says p is complete; a vCPU paused mid-page leaves exactly that page with tail p and
# head p-1 (verify_selfcheck accepts that one page at the boundary).
.include "_defs.S"
.global start
start:
    WORKLOAD_ENTRY
next_pass:
    mov rax, qword ptr [rbp + MB_PASSES]
    inc rax
    mov qword ptr [rbp + L_PASS], rax
    mov qword ptr [rbp + L_CURSOR], 0
next_page:
    mov rbx, qword ptr [rbp + L_CURSOR]
    shl rbx, 12
    mov eax, dword ptr [rbp + SH_BASE]
    add rbx, rax                          # rbx = page address
    mov rax, qword ptr [rbp + L_PASS]
    dec rax                               # rax = expected previous pass
    xor ecx, ecx                          # expected frame: 0 for pass 0 ...
    test rax, rax
    jz 1f
    mov rcx, rbx                          # ... else the page's frame number
    shr rcx, 12
1:
    cmp qword ptr [rbx], rax
    jne mismatch
    cmp qword ptr [rbx + 4088], rax
    jne mismatch
    cmp qword ptr [rbx + 8], rcx
    je stamp
mismatch:
    mov rax, qword ptr [rbp + MB_ERRORS]
    inc qword ptr [rbp + MB_ERRORS]
    test rax, rax
    jnz stamp
    EVENT EV_ERROR
stamp:
    mov rax, qword ptr [rbp + L_PASS]
    mov qword ptr [rbx + 4088], rax
    movq xmm0, rax
    mov rcx, rbx
    shr rcx, 12
    movq xmm1, rcx
    punpcklqdq xmm0, xmm1
    movdqa xmmword ptr [rbx], xmm0
    PAGE_DONE
    mov rax, qword ptr [rbp + L_CURSOR]
    inc rax
    mov qword ptr [rbp + L_CURSOR], rax
    mov ecx, dword ptr [rbp + SH_NPAGES]
    cmp rax, rcx
    jb next_page
    mov rax, qword ptr [rbp + L_PASS]
    mov qword ptr [rbp + MB_PASSES], rax
    EVENT EV_PASS
    jmp next_pass

.include "_lib.S"
