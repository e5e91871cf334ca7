# compute (defined in pymig/guest/workloads.py): fills this vCPU's share of the region with a
# xorshift64 sequence (13, 7, 17) from the share's seed (the first word is the seed's
# successor), then for P_ROUNDS rounds:
#   s = XOR over words j of rotl64(w[j] + j, j mod 64)   (j counts from the share's start)
#   c = rotl64(c, 1) XOR s;  w[j] += s (mod 2^64) for every word
# with c = 0 at the start; then writes c to the mailbox result, done = 1, raises EV_DONE and
# parks.  The running c lives in R13 and is migrated with the vCPU.
.include "_defs.S"
.global start
start:
    WORKLOAD_ENTRY
    mov ebx, dword ptr [rbp + SH_BASE]
    mov r12d, dword ptr [rbp + SH_NPAGES]
    shl r12, 9                              # r12 = words in the share
    # --- fill
    mov rax, qword ptr [rbp + SH_SEED]
    xor edi, edi
fill:
    XORSHIFT64 rax, rdx
    mov qword ptr [rbx + rdi * 8], rax
    inc rdi
    test edi, 511
    jnz 1f
    PAGE_DONE
1:
    cmp rdi, r12
    jb fill
    xor r13d, r13d                          # c = 0
round:
    mov rax, qword ptr [rbp + MB_PASSES]
    mov ecx, dword ptr [P_ROUNDS]
    cmp rax, rcx
    jae finished
    # --- s = XOR of rotl64(w[j] + j, j & 63)   (rol masks its count to 6 bits).  Adding j ties
    # each word to its place: every page starts at a multiple of 64 words, so without it the
    # XOR could not tell two pages apart and a page delivered to the wrong frame would go
    # unnoticed.
    xor r14d, r14d
    xor edi, edi
fold:
    mov rax, qword ptr [rbx + rdi * 8]
    add rax, rdi
    mov ecx, edi
    rol rax, cl
    xor r14, rax
    inc rdi
    cmp rdi, r12
    jb fold
    # --- c = rotl64(c, 1) ^ s
    rol r13, 1
    xor r13, r14
    # --- w[j] += s
    xor edi, edi
feed:
    add qword ptr [rbx + rdi * 8], r14
    inc rdi
    test edi, 511
    jnz 2f
    PAGE_DONE
2:
    cmp rdi, r12
    jb feed
    inc qword ptr [rbp + MB_PASSES]
    jmp round
finished:
    mov qword ptr [rbp + MB_RESULT], r13
    mov qword ptr [rbp + MB_DONE], 1
    EVENT EV_DONE
    HALT_FOREVER

.include "_lib.S"
