//! Entry code, real-mode setup sectors, exception stubs and the mem* functions.
//!
//! Three ways in, one Rust `rhyve_main`:
//! - `startup_64` (payload offset 0x200): Linux 64-bit boot protocol, RSI = boot_params.
//! - `startup_32` (payload offset 0x000): Linux 32-bit boot protocol, ESI = boot_params
//!   (reached from our real-mode setup code when a BIOS loader such as QEMU's option ROM boots us).
//! - `pvh_start32`: PVH, 32-bit protected mode without paging, EBX = hvm_start_info.
//!
//! The entry code records what it found in `entry_state` (laid out as `EntryState` in main.rs)
//! before changing anything, so the report describes the loader's state, not ours.

// Field offsets of `entry_state`; main.rs checks them against `EntryState` at compile time.
core::arch::global_asm!(
    r#"
    .set ES_KIND,    0
    .set ES_INFO,    8
    .set ES_CR0_32,  16
    .set ES_CR0,     24
    .set ES_CR3,     32
    .set ES_CR4,     40
    .set ES_EFER,    48
    .set ES_RFLAGS,  56
    .set ES_CS,      64
    .set ES_DS,      72
    .set ES_ES,      80
    .set ES_SS,      88
    .set ES_GDT,     96
    .set ES_SIZE,    112

    .pushsection .data.entry_state, "aw", @progbits
    .balign 16
    .globl entry_state
entry_state:
    .fill ES_SIZE, 1, 0

    /* Our GDT for the 32-bit paths: 0x08 flat 32-bit code, 0x10 64-bit code, 0x18 flat data
       (the selectors Linux's boot protocol names __BOOT_CS/__BOOT_DS). */
    .balign 16
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
gdt_end:
    .balign 8
    .word 0, 0, 0
gdt_desc:
    .word gdt_end - gdt - 1
    .quad gdt
    .popsection

    /* Minimal kernel_info (boot protocol 2.15): the packager points kernel_info_offset here. */
    .pushsection .rodata.kernel_info, "a", @progbits
    .balign 4
    .globl kernel_info
kernel_info:
    .ascii "LToP"
    .long 16, 16, 0
    .popsection

    /* The stack sits below the page tables so that an overflow cannot corrupt them (main.rs
       checks the stack's bottom word). */
    .pushsection .bss.boot, "aw", @nobits
    .balign 4096
    .globl stack_bottom
stack_bottom: .skip 16384
stack_top:
pt_pml4: .skip 4096
pt_pdpt: .skip 4096
pt_pd:   .skip 4 * 4096
    .popsection

    /* PVH note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen", 32-bit entry address. */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18
    .asciz "Xen"
    .long pvh_start32
    .popsection

    .pushsection .text.head, "ax", @progbits
    .code32
    .globl startup_32
startup_32:
    cli
    cld
    movl $stack_top, %esp
    pushfl
    popl entry_state + ES_RFLAGS
    movl %esi, entry_state + ES_INFO
    movl $1, entry_state + ES_KIND
    jmp common32

    /* Linux's startup_64 convention: the 64-bit entry is 0x200 bytes into the payload. */
    .org 0x200
    .code64
    .globl startup_64
startup_64:
    /* Loaders give no stack: ours is needed for pushfq and the call below. */
    leaq stack_top(%rip), %rsp
    pushfq
    popq entry_state + ES_RFLAGS(%rip)
    cli
    cld
    movq %rsi, entry_state + ES_INFO(%rip)
    movq $0, entry_state + ES_KIND(%rip)
    call record64
    /* Zero .bss only now: the stack lives there, but nothing on it is live any more. */
    leaq _bss_start(%rip), %rdi
    leaq _bss_end(%rip), %rcx
    subq %rdi, %rcx
    shrq $3, %rcx
    xorl %eax, %eax
    rep stosq
    jmp common64
    .popsection

    .pushsection .text.entry, "ax", @progbits
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    movl $stack_top, %esp
    pushfl
    popl entry_state + ES_RFLAGS
    movl %ebx, entry_state + ES_INFO
    movl $2, entry_state + ES_KIND
    jmp common32

    /* 32-bit protected mode, paging off: build an identity map of 4 GiB, enter long mode. */
common32:
    movl %cr0, %eax
    movl %eax, entry_state + ES_CR0_32
    lgdt gdt_desc
    ljmp $0x08, $1f
1:  movl $0x18, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $_bss_start, %edi
    movl $_bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl
    movl $stack_top, %esp
    movl $(pt_pdpt + 3), pt_pml4
    movl $(pt_pd + 0x0003), pt_pdpt
    movl $(pt_pd + 0x1003), pt_pdpt + 8
    movl $(pt_pd + 0x2003), pt_pdpt + 16
    movl $(pt_pd + 0x3003), pt_pdpt + 24
    /* 2048 PDEs of 2 MiB pages (PS|RW|P), so no 1 GiB-page support is needed. */
    movl $pt_pd, %edi
    movl $0x83, %eax
    movl $2048, %ecx
2:  movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    decl %ecx
    jnz 2b
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $pt_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmp $0x10, $3f
    .code64
3:  movl $0x18, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    leaq stack_top(%rip), %rsp
    call record64
    jmp common64

    /* Record the long-mode state we run in (for the 64-bit entry: the loader's state). */
record64:
    movq %cr0, %rax
    movq %rax, entry_state + ES_CR0(%rip)
    movq %cr3, %rax
    movq %rax, entry_state + ES_CR3(%rip)
    movq %cr4, %rax
    movq %rax, entry_state + ES_CR4(%rip)
    movl $0xc0000080, %ecx
    rdmsr
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, entry_state + ES_EFER(%rip)
    xorl %eax, %eax
    movw %cs, %ax
    movq %rax, entry_state + ES_CS(%rip)
    movw %ds, %ax
    movq %rax, entry_state + ES_DS(%rip)
    movw %es, %ax
    movq %rax, entry_state + ES_ES(%rip)
    movw %ss, %ax
    movq %rax, entry_state + ES_SS(%rip)
    sgdt entry_state + ES_GDT(%rip)
    ret

    /* The Rust code is built without SSE (guests/.cargo/config.toml), so no boot protocol's
       CR0/CR4 FPU settings matter to it. */
common64:
    xorl %ebp, %ebp
    call rhyve_main
4:  cli
    hlt
    jmp 4b

    /* Exception stubs, 16 bytes apart: push the vector, then a common path into Rust. The
       Rust side knows which vectors also pushed an error code. */
    .balign 16
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 32
    .balign 16
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr
isr_common:
    movq %rsp, %rdi
    andq $-16, %rsp
    call rhyve_fault
5:  cli
    hlt
    jmp 5b

    /* Device and timer interrupts (vectors IRQ_FIRST.., see irq.rs), 16 bytes apart: count
       the vector in IRQ_COUNTS[n], EOI to the local APIC, return. Interrupts are only ever
       enabled inside irq::wait's `sti; hlt; cli`, so the interrupted code is that asm block
       (no red zone in use below its RSP).
       The return avoids iretq, which KVM's instruction emulator cannot do in long mode (and
       the code after an exit, the EOI here, may run through it): the interrupted RIP and
       RFLAGS go onto the interrupted stack, then `popfq; ret`. Frame (no error code): RIP at
       16(%rsp) once RAX and RCX are pushed, CS 24, RFLAGS 32, RSP 40, SS 48. The frame ends
       at or below the old RSP, so the two words written below it land on the frame's SS and
       RSP slots (read before) or above the frame. */
    .balign 16
    .globl irq_stubs
irq_stubs:
    .set n, 0
    .rept 8
    .balign 16
    pushq %rax
    movl $n, %eax
    jmp irq_common
    .set n, n + 1
    .endr
irq_common:
    pushq %rcx
    leaq IRQ_COUNTS(%rip), %rcx
    incq (%rcx,%rax,8)
    movl $0xfee000b0, %ecx
    movl $0, (%rcx)
    movq 40(%rsp), %rax
    movq 16(%rsp), %rcx
    movq %rcx, -8(%rax)
    movq 32(%rsp), %rcx
    movq %rcx, -16(%rax)
    subq $16, %rax
    /* The CS slot (never overwritten above) carries the new RSP past the pops. */
    movq %rax, 24(%rsp)
    popq %rcx
    popq %rax
    movq 8(%rsp), %rsp
    popfq
    ret
    .popsection

    /* The host target's compiler_builtins leaves these to libc, which we do not have. */
    .pushsection .text.mem, "ax", @progbits
    .globl memcpy
memcpy:
    movq %rdi, %rax
    movq %rdx, %rcx
    rep movsb
    ret
    .globl memset
memset:
    movq %rdi, %r8
    movl %esi, %eax
    movq %rdx, %rcx
    rep stosb
    movq %r8, %rax
    ret
    .globl memmove
memmove:
    movq %rdi, %rax
    movq %rdx, %rcx
    cmpq %rsi, %rdi
    jbe 6f
    leaq -1(%rsi,%rdx), %rsi
    leaq -1(%rdi,%rdx), %rdi
    std
    rep movsb
    cld
    ret
6:  rep movsb
    ret
    .globl memcmp
    .globl bcmp
memcmp:
bcmp:
    xorl %eax, %eax
7:  testq %rdx, %rdx
    jz 8f
    movzbl (%rdi), %eax
    movzbl (%rsi), %ecx
    subl %ecx, %eax
    jnz 8f
    incq %rdi
    incq %rsi
    decq %rdx
    jmp 7b
8:  ret
    .popsection
"#,
    options(att_syntax)
);

// The real-mode setup sectors of the bzImage. A non-allocated section: it is not part of the
// loaded ELF (PVH) image; the packager copies it in front of the payload and patches
// setup_sects, syssize, init_size and kernel_info_offset. Only label differences are used, so
// the code is position independent within its segment (the loader picks the segment).
//
// Loaders that use the 64-bit (or 32-bit) boot protocol never run this code; BIOS loaders such
// as QEMU's option ROM jump to setup+0x200 in real mode with DS = ES = SS = the setup segment.
// Like Linux's setup code it builds a zeroed boot_params (at setup+0x8000), copies the header
// into it, asks the BIOS for the E820 map, enables A20 and enters startup_32 at code32_start.
core::arch::global_asm!(
    r#"
    .pushsection .rhyve.setup, "", @progbits
    .code16
setup_base:
    .org 0x1f1
    .byte 0             /* 0x1f1 setup_sects (packager) */
    .word 0             /* 0x1f2 root_flags */
    .long 0             /* 0x1f4 syssize (packager) */
    .word 0             /* 0x1f8 ram_size */
    .word 0xffff        /* 0x1fa vid_mode: normal */
    .word 0             /* 0x1fc root_dev */
    .word 0xaa55        /* 0x1fe boot_flag */
    .byte 0xeb          /* 0x200 jmp setup_start (the header's length is in this byte) */
    .byte setup_start - 1f
1:  .ascii "HdrS"       /* 0x202 */
    .word 0x020f        /* 0x206 version 2.15 */
    .long 0             /* 0x208 realmode_swtch */
    .word 0x1000        /* 0x20c start_sys_seg */
    .word kernel_version - setup_base - 0x200 /* 0x20e */
    .byte 0             /* 0x210 type_of_loader */
    .byte 0x01          /* 0x211 loadflags: LOADED_HIGH */
    .word 0             /* 0x212 setup_move_size */
    .long 0x100000      /* 0x214 code32_start */
    .long 0             /* 0x218 ramdisk_image */
    .long 0             /* 0x21c ramdisk_size */
    .long 0             /* 0x220 bootsect_kludge */
    .word 0             /* 0x224 heap_end_ptr */
    .byte 0             /* 0x226 ext_loader_ver */
    .byte 0             /* 0x227 ext_loader_type */
    .long 0             /* 0x228 cmd_line_ptr */
    .long 0x7fffffff    /* 0x22c initrd_addr_max */
    .long 0x200000      /* 0x230 kernel_alignment */
    .byte 0             /* 0x234 relocatable_kernel */
    .byte 21            /* 0x235 min_alignment (2 MiB) */
    .word 0x3           /* 0x236 xloadflags: XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G */
    .long 2047          /* 0x238 cmdline_size */
    .long 0             /* 0x23c hardware_subarch */
    .quad 0             /* 0x240 hardware_subarch_data */
    .long 0             /* 0x248 payload_offset */
    .long 0             /* 0x24c payload_length */
    .quad 0             /* 0x250 setup_data */
    .quad 0x100000      /* 0x258 pref_address */
    .long 0             /* 0x260 init_size (packager) */
    .long 0             /* 0x264 handover_offset */
    .long 0             /* 0x268 kernel_info_offset (packager) */
hdr_end:

setup_start:
    cli
    cld
    movw %ds, %ax
    movw %ax, %es
    movw %ax, %ss
    movw $0x7ff0, %sp
    /* boot_params = zeroed 4 KiB at setup+0x8000, with the (loader-filled) header copied in. */
    movw $0x8000, %di
    movw $0x800, %cx
    xorw %ax, %ax
    rep stosw
    movw $0x1f1, %si
    movw $0x81f1, %di
    movw $(hdr_end - setup_base - 0x1f1), %cx
    rep movsb
    /* E820 from the BIOS into boot_params.e820_table (0x2d0), count at 0x1e8. */
    xorl %ebx, %ebx
    xorw %bp, %bp
    movw $0x82d0, %di
2:  movl $0xe820, %eax
    movl $0x534d4150, %edx
    movl $20, %ecx
    int $0x15
    jc 3f
    cmpl $0x534d4150, %eax
    jne 3f
    incw %bp
    addw $20, %di
    cmpw $128, %bp
    jae 3f
    testl %ebx, %ebx
    jnz 2b
3:  movw %bp, %ax
    movb %al, 0x81e8
    /* Fast A20. */
    inb $0x92, %al
    orb $2, %al
    andb $0xfe, %al
    outb %al, $0x92
    /* EBX = linear address of the setup segment; patch the GDT base and the far jump. */
    xorl %ebx, %ebx
    movw %ds, %bx
    shll $4, %ebx
    movl $(setup_gdt - setup_base), %eax
    addl %ebx, %eax
    movl %eax, setup_gdt_desc - setup_base + 2
    movl $(setup_pm32 - setup_base), %eax
    addl %ebx, %eax
    movl %eax, setup_jmp_off - setup_base
    lgdtl setup_gdt_desc - setup_base
    lidtl setup_idt_desc - setup_base
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    .byte 0x66, 0xea
setup_jmp_off:
    .long 0
    .word 0x10
    .code32
setup_pm32:
    movl $0x18, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %fs
    movl %eax, %gs
    movl %eax, %ss
    leal 0x8000(%ebx), %esi
    jmpl *0x214(%esi)

    .balign 8
setup_gdt:
    .quad 0
    .quad 0
    .quad 0x00cf9a000000ffff  /* 0x10 __BOOT_CS: flat 32-bit code */
    .quad 0x00cf92000000ffff  /* 0x18 __BOOT_DS: flat data */
setup_gdt_end:
setup_gdt_desc:
    .word setup_gdt_end - setup_gdt - 1
    .long 0
setup_idt_desc:
    .word 0
    .long 0
kernel_version:
    .asciz "rhyve-testguest 0.1"
    .balign 512
    .code64
    .popsection
"#,
    options(att_syntax)
);
