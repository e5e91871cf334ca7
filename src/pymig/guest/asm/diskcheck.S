# diskcheck (defined in pymig/guest/workloads.py): drives the master disk of the ATA channel
# (pymig/kvm/ata.py) through its ports, as a BIOS-era driver would: PIO, polling, no
# interrupts.  It runs at CPL 0 in 32-bit protected mode (flat segments, paging off), where
# IN/OUT are the instruction set's own: kvm_pvm emulates this mode instruction by instruction,
# but the workload spends its time in port I/O exits anyway (a sector written with REP OUTSD
# is 128 exits).  vCPU 0 works, any other vCPU halts.
#
# Pass p = 1, 2, ...: for each 4 KiB block b of the working set, read it and check that it
# holds generation p - 1 (pass 1: zero, or any generation of its own), write generation p,
# read it back and check it.  Each sector's stamp: "PMDK", LBA (64 bits), generation, then
# 124 words ((LBA * 0x9E3779B1) ^ (g * 0x85EBCA77)) + i * 0x01000193 for i = 4..127.
# Commands by p mod 3: 1 READ/WRITE SECTORS, 2 READ/WRITE MULTIPLE (8 sectors per DRQ block,
# set at start), 0 READ/WRITE MULTIPLE EXT (LBA48).  Counters in vCPU 0's mailbox record:
# passes, pages_written (blocks written), errors (blocks that failed a check and commands that
# failed), result (commands that failed).
.include "_defs.S"
.code32

.equ ATA_DATA,     0x1f0
.equ ATA_COUNT,    0x1f2
.equ ATA_LBA0,     0x1f3
.equ ATA_DEVICE,   0x1f6
.equ ATA_COMMAND,  0x1f7       # the status register when read
.equ ST_BSY,       0x80
.equ ST_DF,        0x20
.equ ST_DRQ,       0x08
.equ ST_ERR,       0x01
.equ CMD_IDENTIFY, 0xec
.equ CMD_SETMULT,  0xc6
.equ CMD_FLUSH,    0xe7

.equ BLOCK_SECTORS, 8
.equ BLOCK_DWORDS,  1024
.equ RBUF,          0x100000   # the block as read
.equ WBUF,          0x101000   # the block as it should be (and as written)
.equ DISK_MAGIC,    0x4b444d50
.equ DISK_LBA_MUL,  0x9e3779b1
.equ DISK_GEN_MUL,  0x85ebca77
.equ DISK_STEP,     0x01000193

# vCPU 0's mailbox record and locals
.equ MB0_PASSES,  0x6000
.equ MB0_WRITTEN, 0x6008
.equ MB0_ERRORS,  0x6010
.equ MB0_RESULT,  0x6018
.equ D_PASS,      0x7000       # pass being written
.equ D_BLOCK,     0x7004       # block being checked and written
.equ D_READ,      0x7008       # this pass's read command
.equ D_WRITE,     0x700c       # this pass's write command
.equ D_PER_DRQ,   0x7010       # sectors per DRQ block of this pass's commands
.equ D_EXT,       0x7014       # 1: this pass uses the LBA48 forms

.global start
start:
    cli
    cld
    test esi, esi
    jnz park
    mov dx, ATA_DEVICE
    mov al, 0xe0                     # master, LBA
    out dx, al
    mov al, CMD_IDENTIFY
    call command
    call wait_data
    jc fatal
    mov edi, RBUF
    mov ecx, 128
    mov dx, ATA_DATA
    rep insd
    cmp dword ptr [RBUF + 204], 0    # words 102-103: 2 TiB or more is enough
    jne 1f
    mov ecx, dword ptr [P_DISK_BLOCKS]
    shl ecx, 3
    cmp dword ptr [RBUF + 200], ecx  # words 100-101: the disk's sectors
    jb fatal
1:
    mov dx, ATA_COUNT
    mov al, BLOCK_SECTORS
    out dx, al
    mov al, CMD_SETMULT
    call command
    call wait_ready
    jc fatal

next_pass:
    mov eax, dword ptr [MB0_PASSES]
    inc eax
    mov dword ptr [D_PASS], eax
    xor edx, edx
    mov ecx, 3
    div ecx                          # edx = pass mod 3
    mov dword ptr [D_EXT], 0
    mov dword ptr [D_PER_DRQ], BLOCK_SECTORS
    cmp edx, 1
    jne 2f
    mov dword ptr [D_READ], 0x20     # READ SECTORS
    mov dword ptr [D_WRITE], 0x30    # WRITE SECTORS
    mov dword ptr [D_PER_DRQ], 1
    jmp 4f
2:  cmp edx, 2
    jne 3f
    mov dword ptr [D_READ], 0xc4     # READ MULTIPLE
    mov dword ptr [D_WRITE], 0xc5    # WRITE MULTIPLE
    jmp 4f
3:  mov dword ptr [D_READ], 0x29     # READ MULTIPLE EXT
    mov dword ptr [D_WRITE], 0x39    # WRITE MULTIPLE EXT
    mov dword ptr [D_EXT], 1
4:  mov dword ptr [D_BLOCK], 0

next_block:
    mov eax, dword ptr [D_READ]
    call read_block
    jc 6f                            # the failed command is counted
    mov edx, dword ptr [D_PASS]
    dec edx                          # the generation the block should hold
    jnz 5f
    mov edi, RBUF                    # pass 1: an unwritten block is as it should be,
    xor eax, eax
    mov ecx, BLOCK_DWORDS
    repe scasd
    je 6f
    mov edx, dword ptr [RBUF + 12]   # and so is one stamped by an earlier run
5:  call stamp
    call compare
    je 6f
    call data_error
6:  mov edx, dword ptr [D_PASS]
    call stamp
    mov eax, dword ptr [D_WRITE]
    call write_block
    jc 8f                            # not written: not counted
    mov eax, dword ptr [D_READ]
    call read_block
    jc 7f
    call compare
    je 7f
    call data_error
7:  add dword ptr [MB0_WRITTEN], 1
    adc dword ptr [MB0_WRITTEN + 4], 0
8:  mov eax, dword ptr [D_BLOCK]
    inc eax
    mov dword ptr [D_BLOCK], eax
    cmp eax, dword ptr [P_DISK_BLOCKS]
    jb next_block

    mov dx, ATA_DEVICE               # the pass is written: flush it, count it, report it
    mov al, 0xe0
    out dx, al
    mov al, CMD_FLUSH
    call command
    call wait_ready
    jnc 9f
    call device_error
9:  mov eax, dword ptr [D_PASS]
    mov dword ptr [MB0_PASSES], eax
    shl eax, 8
    or eax, EV_PASS
    mov dx, CONTROL_PORT
    out dx, eax
    jmp next_pass

fatal:                               # no usable disk: count it, say it, stop
    call device_error
park:
    cli
1:  hlt
    jmp 1b

# command: write AL to the command register (the task file is set).
command:
    mov dx, ATA_COMMAND
    out dx, al
    ret

# wait_ready: poll until BSY clears; AL = status, CF set if it says ERR or DF.
wait_ready:
    mov dx, ATA_COMMAND
1:  in al, dx
    test al, ST_BSY
    jnz 1b
    test al, ST_ERR | ST_DF
    jnz 2f
    ret                              # CF clear (TEST clears it)
2:  stc
    ret

# wait_data: wait_ready, and CF set unless the device asks for data (DRQ).
wait_data:
    call wait_ready
    jc 1f
    test al, ST_DRQ
    jnz 1f                           # CF clear
    stc
1:  ret

# taskfile: sectors [EBX, EBX + CL) of the master, in this pass's address form.
taskfile:
    mov dx, ATA_DEVICE
    cmp dword ptr [D_EXT], 0
    jne 1f
    mov eax, ebx
    shr eax, 24
    and al, 0x0f
    or al, 0xe0                      # LBA28: LBA 27:24 in the device register
    out dx, al
    mov dx, ATA_COUNT
    mov al, cl
    out dx, al
    mov eax, ebx
    inc dx
    out dx, al                       # LBA 7:0
    shr eax, 8
    inc dx
    out dx, al                       # LBA 15:8
    shr eax, 8
    inc dx
    out dx, al                       # LBA 23:16
    ret
1:  mov al, 0xe0                     # LBA48: each register twice, the high byte first
    out dx, al
    mov dx, ATA_COUNT
    xor al, al
    out dx, al
    mov al, cl
    out dx, al
    mov eax, ebx
    shr eax, 24
    inc dx
    out dx, al                       # LBA 31:24, then 7:0
    mov eax, ebx
    out dx, al
    xor al, al
    inc dx
    out dx, al                       # LBA 39:32, then 15:8
    mov eax, ebx
    shr eax, 8
    out dx, al
    xor al, al
    inc dx
    out dx, al                       # LBA 47:40, then 23:16
    mov eax, ebx
    shr eax, 16
    out dx, al
    ret

# read_block: command EAX reads block D_BLOCK into RBUF; CF set if it failed (counted).
read_block:
    push eax
    mov ebx, dword ptr [D_BLOCK]
    shl ebx, 3
    mov cl, BLOCK_SECTORS
    call taskfile
    pop eax
    call command
    mov edi, RBUF
    mov esi, BLOCK_SECTORS
1:  call wait_data
    jc failed
    mov ecx, dword ptr [D_PER_DRQ]
    sub esi, ecx
    shl ecx, 7                       # dwords in a DRQ block
    mov dx, ATA_DATA
    rep insd
    test esi, esi
    jnz 1b
    call wait_ready                  # and the command ended without an error
    jc failed
    ret

# write_block: command EAX writes WBUF to block D_BLOCK; CF set if it failed (counted).
write_block:
    push eax
    mov ebx, dword ptr [D_BLOCK]
    shl ebx, 3
    mov cl, BLOCK_SECTORS
    call taskfile
    pop eax
    call command
    mov esi, WBUF
    mov edi, BLOCK_SECTORS
1:  call wait_data
    jc failed
    mov ecx, dword ptr [D_PER_DRQ]
    sub edi, ecx
    shl ecx, 7
    mov dx, ATA_DATA
    rep outsd
    test edi, edi
    jnz 1b
    call wait_ready                  # the last block is in the image
    jc failed
    ret

failed:                              # jumped to from read_block / write_block: their return
    call device_error
    stc
    ret

# stamp: WBUF = block D_BLOCK at generation EDX.
stamp:
    push ebx
    push esi
    push edi
    push ebp
    mov edi, WBUF
    mov ebx, dword ptr [D_BLOCK]
    shl ebx, 3
    mov ebp, BLOCK_SECTORS
1:  mov eax, DISK_MAGIC
    stosd
    mov eax, ebx
    stosd                            # LBA 31:0
    xor eax, eax
    stosd                            # LBA 63:32
    mov eax, edx
    stosd                            # generation
    mov eax, ebx
    imul eax, eax, DISK_LBA_MUL
    mov esi, edx
    imul esi, esi, DISK_GEN_MUL
    xor eax, esi
    add eax, 4 * DISK_STEP
    mov ecx, 124
2:  stosd
    add eax, DISK_STEP
    dec ecx
    jnz 2b
    inc ebx
    dec ebp
    jnz 1b
    pop ebp
    pop edi
    pop esi
    pop ebx
    ret

# compare: ZF set if RBUF holds what WBUF does.
compare:
    mov esi, RBUF
    mov edi, WBUF
    mov ecx, BLOCK_DWORDS
    repe cmpsd
    ret

# device_error: a command failed: count it in result, then as data_error.
device_error:
    add dword ptr [MB0_RESULT], 1
    adc dword ptr [MB0_RESULT + 4], 0
# data_error: count an error; the first also raises EV_ERROR with the block's number.
data_error:
    push eax
    push edx
    mov eax, dword ptr [MB0_ERRORS]
    or eax, dword ptr [MB0_ERRORS + 4]
    add dword ptr [MB0_ERRORS], 1
    adc dword ptr [MB0_ERRORS + 4], 0
    test eax, eax
    jnz 1f
    mov eax, dword ptr [D_BLOCK]
    shl eax, 8
    or eax, EV_ERROR
    mov dx, CONTROL_PORT
    out dx, eax
1:  pop edx
    pop eax
    ret
