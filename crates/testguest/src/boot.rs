//! Everything that runs at CPL 0, in assembly.
//!
//! Under kvm-pvm every CPL-0 instruction is emulated (about 1 M/s), so this
//! file holds all of the guest's privileged code and keeps it to plain,
//! common instructions: mode switches, page tables, GDT/TSS/IDT, a seven
//! instruction timer handler, a few services for ring 3 (through #UD) and the
//! hand-off of fatal exceptions to ring 3. Everything else runs at CPL 3.
//!
//! Boot path: `pvh_entry32` (32-bit, paging off, ebx = hvm_start_info) builds
//! identity page tables from the memmap, enters long mode and falls into
//! `entry64`, the per-CPU setup shared with application processors (which
//! come in through the real-mode trampoline copied to 0x8000). `entry64`
//! ends with an `iretq` to `user_entry(cpu)` in ring 3.

use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicU32, AtomicU64};

/// Most vCPUs the guest drives.
pub const MAX_CPUS: usize = 8;
/// Size of each CPU's CPL-0 stack (page aligned; its tick counter follows it).
pub const KSTACK_SIZE: usize = 4096;
/// Ring-3 stack size per CPU.
pub const USTACK_SIZE: usize = 64 * 1024;
/// Ring-3 stack used to report a fatal exception.
pub const FSTACK_SIZE: usize = 16 * 1024;
/// RAM above this is not mapped (2 MiB pages, one page directory per GiB).
pub const MAX_RAM_GIB: usize = 64;
/// Physical address the AP trampoline is copied to (SIPI vector 0x08).
pub const TRAMPOLINE_ADDR: usize = 0x8000;
/// LAPIC timer interrupt vector.
pub const TIMER_VECTOR: u32 = 0x40;
/// LAPIC spurious interrupt vector (no EOI).
pub const SPURIOUS_VECTOR: u32 = 0xff;
/// Physical (= virtual) address of the xAPIC registers.
pub const LAPIC_BASE: u64 = 0xfee0_0000;

/// Ring-3 selectors.
pub const USER_CS: u64 = 0x2b;
/// Ring-3 stack selector.
pub const USER_SS: u64 = 0x23;

/// Per-CPU data used by CPL-0 code. The timer handler finds `ticks` as the
/// word right after the (page-aligned) kernel stack it runs on, so the layout
/// is fixed: `stack` first, `ticks` at offset 4096.
#[repr(C, align(4096))]
pub struct KernelCpu {
    stack: UnsafeCell<[u8; KSTACK_SIZE]>,
    /// LAPIC timer interrupts taken by this CPU (incremented at CPL 0).
    pub ticks: AtomicU64,
    /// Word at FS base; ring 3 reads `fs:[0]` to check FS_BASE survived.
    pub fs_word: AtomicU64,
    /// Word at GS base; ring 3 reads `gs:[0]` to check GS_BASE survived.
    pub gs_word: AtomicU64,
    in_fatal: AtomicU64,
}

// SAFETY: the stack is only touched by its CPU at CPL 0; the rest are atomics.
unsafe impl Sync for KernelCpu {}

/// CPL-0 per-CPU areas (in .bss).
pub static KCPU: [KernelCpu; MAX_CPUS] = [const {
    KernelCpu {
        stack: UnsafeCell::new([0; KSTACK_SIZE]),
        ticks: AtomicU64::new(0),
        fs_word: AtomicU64::new(0),
        gs_word: AtomicU64::new(0),
        in_fatal: AtomicU64::new(0),
    }
}; MAX_CPUS];

/// A page-aligned, zero-initialised stack.
#[repr(C, align(4096))]
pub struct Stack<const N: usize>(UnsafeCell<[u8; N]>);
// SAFETY: each stack is used by one CPU only, and only through its stack pointer.
unsafe impl<const N: usize> Sync for Stack<N> {}

static USTACKS: [Stack<USTACK_SIZE>; MAX_CPUS] =
    [const { Stack(UnsafeCell::new([0; USTACK_SIZE])) }; MAX_CPUS];
static FSTACKS: [Stack<FSTACK_SIZE>; MAX_CPUS] =
    [const { Stack(UnsafeCell::new([0; FSTACK_SIZE])) }; MAX_CPUS];

/// Hardware layout of a 64-bit TSS followed by its I/O permission bitmap.
#[repr(C, packed)]
struct TssHw {
    _reserved0: u32,
    rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
    iomap: [u8; IOMAP_BYTES],
    iomap_end: u8,
}

/// The bitmap covers ports 0..0x400.
const IOMAP_BYTES: usize = 0x400 / 8;

/// Ports ring 3 may use: PIT (calibration, platform check), port 0x61 (PIT
/// gate), the PICs' mask registers (platform check), isa-debug-exit
/// (0xf4..0xf7) and the COM1 UART (0x3f8..0x3ff).
const USER_PORTS: [(u16, u16); 6] = [
    (0x21, 0x21),
    (0x40, 0x43),
    (0x61, 0x61),
    (0xa1, 0xa1),
    (0xf4, 0xf7),
    (0x3f8, 0x3ff),
];

const fn iomap() -> [u8; IOMAP_BYTES] {
    let mut map = [0xffu8; IOMAP_BYTES];
    let mut i = 0;
    while i < USER_PORTS.len() {
        let (lo, hi) = USER_PORTS[i];
        let mut p = lo as usize;
        while p <= hi as usize {
            map[p / 8] &= !(1 << (p % 8));
            p += 1;
        }
        i += 1;
    }
    map
}

#[repr(C, align(256))]
struct TssSlot(UnsafeCell<TssHw>);
// SAFETY: each TSS is written once at CPL 0 by its own CPU, then only read by hardware.
unsafe impl Sync for TssSlot {}

static TSS: [TssSlot; MAX_CPUS] = [const {
    TssSlot(UnsafeCell::new(TssHw {
        _reserved0: 0,
        rsp0: 0,
        rsp1: 0,
        rsp2: 0,
        _reserved1: 0,
        ist: [0; 7],
        _reserved2: 0,
        _reserved3: 0,
        iomap_base: offset_of!(TssHw, iomap) as u16,
        iomap: iomap(),
        iomap_end: 0xff,
    }))
}; MAX_CPUS];

/// Index of the AP being started; read by the trampoline's 32-bit code.
pub static AP_BOOT_INDEX: AtomicU32 = AtomicU32::new(0);
/// Physical address of `hvm_start_info`, saved by the 32-bit entry.
pub static BOOT_START_INFO: AtomicU32 = AtomicU32::new(0);

// Services for ring 3: `call svc_gate` (a `ud2` the #UD handler recognises).
// In: eax = function, edi/esi = arguments. Out: rax (rcx = status for
// rdmsr, rsi = ebx for cpuid). Clobbers rax, rcx, rdx, rsi, rdi.
/// `sti; hlt`: sleep until the next interrupt.
pub const SVC_HALT: u32 = 0;
/// Write LAPIC register `edi` (offset) with `esi`.
pub const SVC_LAPIC_WRITE: u32 = 1;
/// Read LAPIC register `edi` into eax.
pub const SVC_LAPIC_READ: u32 = 2;
/// wrmsr(edi, rsi); rax = 0 on success, 1 if it raised #GP.
pub const SVC_WRMSR: u32 = 3;
/// rax = rdmsr(edi); rcx = 0 on success, 1 if it raised #GP.
pub const SVC_RDMSR: u32 = 4;
/// cpuid(edi, esi) as seen at CPL 0: eax, esi(=ebx), ecx, edx.
pub const SVC_CPUID: u32 = 5;
/// `selftest=regs`: as [`SVC_HALT`], then `not r13` (what a VMM that
/// restores a halted vCPU with a wrong register does).
pub const SVC_HALT_CLOBBER: u32 = 6;
/// rax = system register `edi`: 0 CR0, 1 CR3, 2 CR4, 3 GDTR, 4 IDTR (base
/// << 16 | limit), 5 TR.
pub const SVC_SYSREG: u32 = 7;
/// `selftest=sysreg`: clear CR0.WP.
pub const SVC_CLEAR_WP: u32 = 8;
/// rax = DR`edi & 3` (0 to 3), after writing `rsi` to it if `edi` has bit 8.
pub const SVC_DEBUGREG: u32 = 9;

/// Exit code written to port 0xf4 for a fatal exception is this plus the vector.
pub const EXIT_EXCEPTION_BASE: u32 = 0x40;

global_asm!(
    r#"
    .section .note.xen, "a", @note
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 8                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_entry32       /* read as u32 by linux-loader, as u64 by QEMU */
    .balign 4

    /* ---------------------------------------------------------------- */
    .section .text.boot, "ax"
    .code32
    .globl pvh_entry32
pvh_entry32:
    cli
    cld
    movl $({kcpu} + {KSTACK}), %esp
    movl %ebx, {start_info}
    lgdt gdt_ptr
    ljmp $0x08, $1f
1:  movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs

    cmpl $0x336ec578, (%ebx)        /* hvm_start_info.magic */
    jne bad_magic
    cmpl $1, 4(%ebx)                /* version 1 has the memmap */
    jb bad_memmap
    movl 48(%ebx), %ecx             /* memmap_entries */
    testl %ecx, %ecx
    jz bad_memmap
    movl 40(%ebx), %esi             /* memmap_paddr (below 4 GiB) */

    /* Identity-map every RAM entry with 2 MiB user pages (P|RW|US|PS). */
map_entry:
    cmpl $1, 16(%esi)               /* type 1 = RAM */
    jne next_entry
    movl (%esi), %eax
    movl 4(%esi), %edx
    shrdl $21, %edx, %eax
    shrl $21, %edx
    jnz next_entry
    movl %eax, %edi                 /* first 2 MiB page */
    movl (%esi), %eax
    movl 4(%esi), %edx
    addl 8(%esi), %eax
    adcl 12(%esi), %edx
    addl $0x1fffff, %eax
    adcl $0, %edx
    shrdl $21, %edx, %eax
    shrl $21, %edx
    jnz 2f
    cmpl ${max_pages}, %eax
    jbe 3f
2:  movl ${max_pages}, %eax         /* end (exclusive), clipped */
3:  cmpl %eax, %edi
    jae next_entry
4:  movl %edi, %edx
    shll $21, %edx
    orl $0x87, %edx
    movl %edx, pd_tables(,%edi,8)
    movl %edi, %edx
    shrl $11, %edx
    movl %edx, pd_tables+4(,%edi,8)
    incl %edi
    cmpl %eax, %edi
    jb 4b
next_entry:
    addl $24, %esi
    decl %ecx
    jnz map_entry

    /* LAPIC: supervisor-only, cache-disabled (P|RW|PWT|PCD|PS). */
    movl $0xfee0009b, pd_tables + 8 * (0xfee00000 >> 21)

    xorl %edi, %edi
5:  movl %edi, %eax
    shll $12, %eax
    addl $(pd_tables + 7), %eax
    movl %eax, pdpt(,%edi,8)
    incl %edi
    cmpl ${max_gib}, %edi
    jb 5b
    movl $(pdpt + 7), pml4

    xorl %esi, %esi                 /* boot CPU is cpu 0 */
    jmp enter_long32

bad_magic:
    movl $msg_magic, %esi
    jmp fatal32
bad_memmap:
    movl $msg_memmap, %esi
fatal32:
    movw $0x3f8, %dx
6:  movb (%esi), %al
    testb %al, %al
    jz 7f
    outb %al, %dx
    incl %esi
    jmp 6b
7:  movw $0xf4, %dx
    movl $0x21, %eax
    outl %eax, %dx
8:  cli
    hlt
    jmp 8b

    /* APs arrive here from the trampoline, in flat 32-bit protected mode. */
ap_entry32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl {ap_index}, %esi

    /* esi = cpu index. Enable PAE + SSE + XSAVE, long mode, paging. */
enter_long32:
    movl $0x40620, %eax             /* PAE | OSFXSR | OSXMMEXCPT | OSXSAVE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl $0x80010033, %eax          /* PG | WP | NE | ET | MP | PE (clears CD/NW) */
    movl %eax, %cr0
    ljmp $0x18, $entry64

    /* ---------------------------------------------------------------- */
    /* AP trampoline, copied to 0x8000 by ring 3 before the SIPIs. */
    .code16
    .globl tramp_start
tramp_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl ({tramp} + tramp_gdtr - tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $ap_entry32
    .balign 8
tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
    .globl tramp_end
tramp_end:

    .code64
    .section .rodata.boot, "a"
msg_magic:
    .asciz "GUEST FATAL bad hvm_start_info magic\n"
msg_memmap:
    .asciz "GUEST FATAL hvm_start_info has no memmap (version < 1)\n"

    .section .data.boot, "aw"
    .balign 16
    .globl gdt
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff        /* 0x08 code32 */
    .quad 0x00cf92000000ffff        /* 0x10 data */
    .quad 0x00af9a000000ffff        /* 0x18 code64 */
    .quad 0x00cff2000000ffff        /* 0x20 user data (0x23) */
    .quad 0x00affa000000ffff        /* 0x28 user code64 (0x2b) */
    .globl gdt_tss
gdt_tss:                            /* 0x30 + 16 * cpu: TSS descriptors */
    .fill {max_cpus} * 2, 8, 0
    .globl gdt_end
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 8
    .globl idt_ptr
idt_ptr:
    .word {idt_bytes} - 1
    .quad idt

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .globl pml4
pml4:
    .skip 4096
pdpt:
    .skip 4096
pd_tables:
    .skip 4096 * {max_gib}
    .globl idt
idt:
    .skip {idt_bytes}
    .text
"#,
    kcpu = sym KCPU,
    start_info = sym BOOT_START_INFO,
    ap_index = sym AP_BOOT_INDEX,
    KSTACK = const KSTACK_SIZE,
    max_pages = const MAX_RAM_GIB * 512,
    max_gib = const MAX_RAM_GIB,
    max_cpus = const MAX_CPUS,
    tramp = const TRAMPOLINE_ADDR,
    idt_bytes = const IDT_BYTES,
    options(att_syntax)
);

global_asm!(
    r#"
    .section .text.kernel, "ax"
    .code64
    /* Per-CPU setup, shared by the boot CPU and the APs. esi = cpu index. */
    .globl entry64
entry64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movl %esi, %r12d
    movl %esi, %eax
    imull ${kcpu_size}, %eax, %eax
    addq ${kcpu}, %rax
    leaq {KSTACK}(%rax), %rsp       /* top of stack = &ticks */
    testl %r12d, %r12d
    jnz 1f
    call fill_idt
1:
    /* TSS: RSP0 and its GDT descriptor, then ltr. */
    movl %r12d, %eax
    imull ${tss_size}, %eax, %eax
    addq ${tss}, %rax
    movq %rsp, 4(%rax)
    movq %rax, %rdx
    andl $0xffffff, %edx
    shlq $16, %rdx
    orq ${tss_limit}, %rdx
    movq %rax, %rcx
    shrq $24, %rcx
    andl $0xff, %ecx
    shlq $56, %rcx
    orq %rcx, %rdx
    movabsq $0x0000890000000000, %rcx
    orq %rcx, %rdx
    movl %r12d, %ecx
    shll $4, %ecx
    movq %rdx, gdt_tss(%rcx)
    movq $0, gdt_tss+8(%rcx)
    leal 0x30(%rcx), %eax
    ltr %ax
    lidt idt_ptr

    xorl %ecx, %ecx                 /* XCR0 = x87 | SSE | AVX */
    xorl %edx, %edx
    movl $7, %eax
    xsetbv

    movl $0xfee00350, %eax          /* mask LVT LINT0/LINT1 before IF=1 */
    movl $0x10000, (%rax)
    movl $0x10000, 0x10(%rax)

    pushq ${user_ss}
    leal 1(%r12), %eax
    imull ${ustack_size}, %eax, %eax
    addq ${ustacks}, %rax
    subq $8, %rax
    pushq %rax
    pushq $0x202                    /* IF=1, IOPL=0 */
    pushq ${user_cs}
    pushq ${user_entry}
    movl %r12d, %edi
    iretq

    /* All 256 vectors go to their stub; then the real handlers. */
fill_idt:
    movl $isr_stubs, %esi
    xorl %edi, %edi
2:  movl $0x8e, %edx
    call set_gate
    addq $16, %rsi
    incl %edi
    cmpl $256, %edi
    jb 2b
    movl ${timer_vector}, %edi
    movl $timer_isr, %esi
    movl $0x8e, %edx
    call set_gate
    movl ${spurious_vector}, %edi
    movl $spurious_isr, %esi
    call set_gate
    movl $6, %edi                   /* #UD: services, else fatal */
    movl $ud_isr, %esi
    call set_gate
    ret

    /* edi = vector, rsi = handler (< 4 GiB), edx = type byte. */
set_gate:
    movl %edi, %ecx
    shll $4, %ecx
    movq %rsi, %rax
    andl $0xffff, %eax
    movq %rsi, %r8
    shrq $16, %r8
    shlq $48, %r8
    orq %r8, %rax
    movq %rdx, %r8
    shlq $40, %r8
    orq %r8, %rax
    orq $0x180000, %rax             /* selector 0x18 */
    movq %rax, idt(%rcx)
    movq $0, idt+8(%rcx)
    ret

    /* LAPIC timer: count a tick in the word after this CPU's kernel stack. */
timer_isr:
    pushq %rax
    movq %rsp, %rax
    andq $-4096, %rax
    incq 4096(%rax)
    movl $0xfee000b0, %eax
    movl $0, (%rax)                 /* EOI */
    popq %rax
    iretq

spurious_isr:
    iretq

    /* #UD. At `svc_gate` (a ud2 in ring-3 code) it is a service call from
     * ring 3 (kvm-pvm raises #UD for `int n` from ring 3, so services use
     * the exception path); anywhere else it is fatal. */
ud_isr:
    cmpq ${svc_gate}, (%rsp)
    jne 1f
    cmpl $0, %eax
    je svc_halt
    cmpl $1, %eax
    je svc_lapic_write
    cmpl $2, %eax
    je svc_lapic_read
    cmpl $3, %eax
    je svc_wrmsr
    cmpl $4, %eax
    je svc_rdmsr
    cmpl $5, %eax
    je svc_cpuid
    cmpl $6, %eax
    je svc_halt_clobber
    cmpl $7, %eax
    je svc_sysreg
    cmpl $8, %eax
    je svc_clear_wp
    cmpl $9, %eax
    je svc_debugreg
    ud2                             /* unknown service: a CPL-0 #UD */
1:  pushq $0
    pushq $6
    jmp exc_common
svc_return:
    addq $2, (%rsp)                 /* step over the ud2 */
    iretq
svc_halt:                           /* no register changes (see checks::Checker::halt) */
    sti
    hlt
    jmp svc_return
svc_halt_clobber:
    sti
    hlt
    notq %r13
    jmp svc_return
svc_sysreg:
    cmpl $3, %edi
    jae 1f
    movq %cr0, %rax
    testl %edi, %edi
    je svc_return
    movq %cr3, %rax
    cmpl $1, %edi
    je svc_return
    movq %cr4, %rax
    jmp svc_return
1:  subq $16, %rsp
    sgdt (%rsp)
    cmpl $3, %edi
    je 2f
    sidt (%rsp)
    cmpl $4, %edi
    je 2f
    xorl %eax, %eax
    str %ax
    addq $16, %rsp
    jmp svc_return
2:  movq 2(%rsp), %rax              /* base << 16 | limit */
    shlq $16, %rax
    movw (%rsp), %ax
    addq $16, %rsp
    jmp svc_return
svc_debugreg:
    movl %edi, %ecx
    andl $3, %ecx
    testl $0x100, %edi
    jz 5f
    cmpl $0, %ecx
    jne 2f
    movq %rsi, %dr0
    jmp 5f
2:  cmpl $1, %ecx
    jne 3f
    movq %rsi, %dr1
    jmp 5f
3:  cmpl $2, %ecx
    jne 4f
    movq %rsi, %dr2
    jmp 5f
4:  movq %rsi, %dr3
5:  movq %dr0, %rax
    cmpl $0, %ecx
    je svc_return
    movq %dr1, %rax
    cmpl $1, %ecx
    je svc_return
    movq %dr2, %rax
    cmpl $2, %ecx
    je svc_return
    movq %dr3, %rax
    jmp svc_return
svc_clear_wp:
    movq %cr0, %rax
    andl $~0x10000, %eax
    movq %rax, %cr0
    jmp svc_return
svc_lapic_write:
    andl $0xff0, %edi
    orl $0xfee00000, %edi
    movl %esi, (%rdi)
    jmp svc_return
svc_lapic_read:
    andl $0xff0, %edi
    orl $0xfee00000, %edi
    movl (%rdi), %eax
    jmp svc_return
svc_wrmsr:
    movl %edi, %ecx
    movl %esi, %eax
    movq %rsi, %rdx
    shrq $32, %rdx
svc_wrmsr_insn:
    wrmsr
    xorl %eax, %eax
    jmp svc_return
svc_wrmsr_fail:
    movl $1, %eax
    jmp svc_return
svc_rdmsr:
    movl %edi, %ecx
svc_rdmsr_insn:
    rdmsr
    shlq $32, %rdx
    orq %rdx, %rax
    xorl %ecx, %ecx
    jmp svc_return
svc_rdmsr_fail:
    xorl %eax, %eax
    movl $1, %ecx
    jmp svc_return
svc_cpuid:
    pushq %rbx
    movl %edi, %eax
    movl %esi, %ecx
    cpuid
    movl %ebx, %esi
    popq %rbx
    jmp svc_return

    /* Exceptions and unexpected vectors: stack = vector, error, frame. */
exc_common:
    cmpq $13, (%rsp)
    jne 3f
    cmpq $svc_wrmsr_insn, 16(%rsp)  /* #GP from the MSR services: fail softly */
    jne 2f
    movq $svc_wrmsr_fail, 16(%rsp)
    addq $16, %rsp
    iretq
2:  cmpq $svc_rdmsr_insn, 16(%rsp)
    jne 3f
    movq $svc_rdmsr_fail, 16(%rsp)
    addq $16, %rsp
    iretq
3:  xorl %eax, %eax                 /* cpu = (TR - 0x30) / 16 */
    str %ax
    subl $0x30, %eax
    shrl $4, %eax
    movl %eax, %r8d
    imull ${kcpu_size}, %eax, %eax
    addq ${kcpu}, %rax
    cmpq $0, {in_fatal}(%rax)
    jne 4f
    movq $1, {in_fatal}(%rax)
    movq (%rsp), %rdi               /* vector */
    movq 8(%rsp), %rsi              /* error code */
    movq 16(%rsp), %rdx             /* rip */
    movq %cr2, %rcx
    movq 24(%rsp), %r9              /* cs */
    leal 1(%r8), %eax
    imull ${fstack_size}, %eax, %eax
    addq ${fstacks}, %rax
    subq $8, %rax
    pushq ${user_ss}                /* report it from ring 3, IF=0 */
    pushq %rax
    pushq $0x2
    pushq ${user_cs}
    pushq ${user_fatal}
    iretq
4:  movw $0xf4, %dx                 /* fault while reporting a fault */
    movl $0x7f, %eax
    outl %eax, %dx
5:  cli
    hlt
    jmp 5b

    .balign 16
isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp exc_common
    .set vec, vec + 1
    .endr
    .text
"#,
    kcpu = sym KCPU,
    tss = sym TSS,
    ustacks = sym USTACKS,
    fstacks = sym FSTACKS,
    user_entry = sym crate::user_entry,
    user_fatal = sym crate::user_fatal,
    svc_gate = sym crate::cpu::svc_gate,
    KSTACK = const KSTACK_SIZE,
    kcpu_size = const size_of::<KernelCpu>(),
    in_fatal = const offset_of!(KernelCpu, in_fatal),
    tss_size = const size_of::<TssSlot>(),
    tss_limit = const size_of::<TssHw>() - 1,
    ustack_size = const USTACK_SIZE,
    fstack_size = const FSTACK_SIZE,
    user_cs = const USER_CS,
    user_ss = const USER_SS,
    timer_vector = const TIMER_VECTOR,
    spurious_vector = const SPURIOUS_VECTOR,
    options(att_syntax)
);

const _: () = {
    assert!(offset_of!(KernelCpu, ticks) == KSTACK_SIZE);
    assert!(size_of::<TssHw>() == 0x68 + IOMAP_BYTES + 1);
    assert!(offset_of!(TssHw, rsp0) == 4);
    assert!(size_of::<TssSlot>() == 256);
};

unsafe extern "C" {
    static tramp_start: u8;
    static tramp_end: u8;
    static __image_start: u8;
    static __readonly_end: u8;
    static __image_end: u8;
    static pml4: u8;
    static gdt: u8;
    static gdt_end: u8;
    static idt: u8;
}

/// Selector of the first TSS descriptor (`0x30 + 16 * cpu`).
pub const GDT_TSS_SEL: usize = 0x30;

/// Bytes of the IDT: 256 gates of 16 bytes.
pub const IDT_BYTES: usize = 256 * 16;

/// The part of the image never written after the boot (`.note.xen`,
/// `.text`, `.rodata`), page aligned: (address, bytes).
pub fn readonly_range() -> (u64, u64) {
    let start = (&raw const __image_start) as u64;
    (start, (&raw const __readonly_end) as u64 - start)
}

/// The page tables: PML4, PDPT, then one page directory per GiB
/// (address, bytes).
pub fn page_tables_range() -> (u64, u64) {
    ((&raw const pml4) as u64, (2 + MAX_RAM_GIB as u64) * 4096)
}

/// The GDT (address, bytes): 6 descriptors, then a 16-byte TSS
/// descriptor per CPU.
pub fn gdt_range() -> (u64, u64) {
    let start = (&raw const gdt) as u64;
    (start, (&raw const gdt_end) as u64 - start)
}

/// The IDT: 256 16-byte gates.
pub fn idt_addr() -> u64 {
    (&raw const idt) as u64
}

/// The TSSs, one 256-byte slot per CPU (address, bytes).
pub fn tss_range() -> (u64, u64) {
    (TSS.as_ptr() as u64, size_of::<[TssSlot; MAX_CPUS]>() as u64)
}

/// The AP trampoline image (to be copied to [`TRAMPOLINE_ADDR`]).
pub fn trampoline() -> &'static [u8] {
    // SAFETY: both symbols delimit the trampoline code inside .text.
    unsafe {
        let start = &raw const tramp_start;
        let end = &raw const tramp_end;
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// First byte after the loaded image and its .bss.
pub fn image_end() -> u64 {
    (&raw const __image_end) as u64
}

/// Address and size of the ring-3 stacks (for the layout line).
pub fn stacks_range() -> (u64, u64) {
    (
        USTACKS.as_ptr() as u64,
        size_of::<[Stack<USTACK_SIZE>; MAX_CPUS]>() as u64,
    )
}
