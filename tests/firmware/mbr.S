/*
 * A boot sector for the firmware tests: the BIOS loads it at 0x7c00 and jumps to it with
 * the boot drive in DL. It reads 2 x 32 sectors through int 13h's LBA extension (LBA 1 to
 * 0x8000 and LBA 2048 to 0x10000), checks that each sector holds its LBA (a word) followed
 * by 510 bytes of (LBA ^ 0x5a), reports on COM1 and ends through pc-testdev (port 0xf4):
 * It prints its first line with rep outsb and reads COM1's line status four times with
 * rep insb: string I/O is one port access per element.
 * 0x10 all good, 0x11 no int 13h extensions, 0x12 a read failed, 0x13 wrong data,
 * 0x14 string I/O went wrong, 0x15 an unassigned port (0xAF00, which OVMF probes) did
 * not read all-ones.
 * With --defsym END_MODE=1 success ends in an i8042 reset instead, with END_MODE=2 in
 * cli; hlt (bhyve's exit statuses 0 and 2).
 * Assembled by the tests: as --32, ld -m elf_i386 -Ttext 0x7c00 --oformat binary.
 */
        .ifndef END_MODE
        .set END_MODE, 0
        .endif
        .code16
        .intel_syntax noprefix
        .globl _start
_start:
        cli
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7c00
        sti
        mov [drive], dl
        cld
        mov si, offset msg_start
        mov cx, offset msg_start_end - msg_start
        mov dx, 0x3f8
        /* Without interrupts: SeaBIOS's serial console flushes its own output from the
         * timer interrupt, which would land between our bytes. */
        cli
        rep outsb
        sti
        mov di, offset lsr
        mov cx, 4
        mov dx, 0x3fd
        rep insb
        cmp dword ptr [lsr], 0x60606060
        jne bad_string_io
        mov dx, 0xaf00
        in ax, dx
        cmp ax, 0xffff
        jne bad_port

        mov ah, 0x41
        mov bx, 0x55aa
        mov dl, [drive]
        int 0x13
        jc no_edd
        cmp bx, 0xaa55
        jne no_edd

        mov si, offset dap_low
        call read
        mov si, offset dap_high
        call read

        mov ax, 0x0800
        mov bx, 1
        call verify
        mov ax, 0x1000
        mov bx, 2048
        call verify

        mov si, offset msg_ok
        mov al, 0x10
        jmp finish
no_edd:
        mov si, offset msg_no_edd
        mov al, 0x11
        jmp finish
read_failed:
        mov si, offset msg_read
        mov al, 0x12
        jmp finish
bad_data:
        mov si, offset msg_data
        mov al, 0x13
        jmp finish
bad_string_io:
        mov si, offset msg_string
        mov al, 0x14
        jmp finish
bad_port:
        mov si, offset msg_port
        mov al, 0x15
finish:
        push ax
        xor ax, ax
        mov ds, ax
        call puts
        pop ax
        .if END_MODE == 1
        cmp al, 0x10
        jne testdev
        mov al, 0xfe
        out 0x64, al
        .elseif END_MODE == 2
        cmp al, 0x10
        jne testdev
        cli
        hlt
        .endif
testdev:
        out 0xf4, al
1:      hlt
        jmp 1b

/* int 13h AH=42h with the disk address packet at SI. */
read:
        mov ah, 0x42
        mov dl, [drive]
        int 0x13
        jc read_failed
        ret

/* 32 sectors at AX:0, the first being LBA BX. */
verify:
        mov es, ax
        xor di, di
        mov cx, 32
2:      cmp es:[di], bx
        jne bad_data
        mov al, bl
        xor al, 0x5a
        push cx
        push di
        add di, 2
        mov cx, 510
        cld
        repe scasb
        pop di
        pop cx
        jne bad_data
        add di, 512
        inc bx
        loop 2b
        ret

/* The NUL-terminated string at DS:SI to COM1, polling the transmitter. */
puts:
        lodsb
        test al, al
        jz 4f
        mov ah, al
        mov dx, 0x3fd
3:      in al, dx
        test al, 0x20
        jz 3b
        mov al, ah
        mov dx, 0x3f8
        out dx, al
        jmp puts
4:      ret

        .p2align 2
dap_low:
        .byte 16, 0
        .word 32, 0x0000, 0x0800
        .quad 1
dap_high:
        .byte 16, 0
        .word 32, 0x0000, 0x1000
        .quad 2048
drive:  .byte 0
lsr:    .long 0
msg_start:  .ascii "rhyve-mbr: started\r\n"
msg_start_end:
msg_ok:     .asciz "rhyve-mbr: read 64 sectors through int 13h: data ok\r\n"
msg_no_edd: .asciz "rhyve-mbr: FAIL edd\r\n"
msg_read:   .asciz "rhyve-mbr: FAIL read\r\n"
msg_data:   .asciz "rhyve-mbr: FAIL data\r\n"
msg_string: .asciz "rhyve-mbr: FAIL string I/O\r\n"
msg_port:   .asciz "rhyve-mbr: FAIL port\r\n"

        . = _start + 510
        .byte 0x55, 0xaa
