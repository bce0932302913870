//! Ring-3 wrappers: CPL-0 services, port I/O, TSC, SIMD/x87.

use crate::boot::{
    SVC_CLEAR_WP, SVC_CPUID, SVC_DEBUGREG, SVC_LAPIC_READ, SVC_LAPIC_WRITE, SVC_RDMSR, SVC_SYSREG,
    SVC_WRMSR,
};
use core::arch::asm;

unsafe extern "C" {
    /// The service gate: a `ud2` that the CPL-0 #UD handler turns into a
    /// service call (then resumes after it, at a `ret`).
    pub fn svc_gate();
}

core::arch::global_asm!(
    ".pushsection .text.svc_gate, \"ax\"",
    ".globl svc_gate",
    "svc_gate:",
    "ud2",
    "ret",
    ".popsection"
);

fn svc(func: u32, a: u64, b: u64) -> (u64, u64, u64, u64) {
    let (rax, rcx, rdx, rsi): (u64, u64, u64, u64);
    // SAFETY: the CPL-0 service handler only touches the registers declared
    // here; `call` uses the stack, so no `nostack` (keeps the red zone free).
    unsafe {
        asm!(
            "call {gate}",
            gate = sym svc_gate,
            inout("rax") func as u64 => rax,
            inout("rdi") a => _,
            inout("rsi") b => rsi,
            out("rcx") rcx,
            out("rdx") rdx,
        );
    }
    (rax, rcx, rdx, rsi)
}

/// A system register read at CPL 0: 0 CR0, 1 CR3, 2 CR4, 3 GDTR, 4 IDTR
/// (base << 16 | limit), 5 TR.
pub fn sysreg(index: u32) -> u64 {
    svc(SVC_SYSREG, index as u64, 0).0
}

/// Debug address register DR`n` (0 to 3), read at CPL 0.
pub fn debugreg(n: u32) -> u64 {
    svc(SVC_DEBUGREG, (n & 3) as u64, 0).0
}

/// Writes `value` to DR`n` (0 to 3) at CPL 0; what it reads back.
pub fn set_debugreg(n: u32, value: u64) -> u64 {
    svc(SVC_DEBUGREG, (n & 3) as u64 | 0x100, value).0
}

/// Clear CR0.WP (`selftest=sysreg`).
pub fn clear_wp() {
    svc(SVC_CLEAR_WP, 0, 0);
}

/// Call an unknown service: CPL 0 executes `ud2` (self-test of the fatal path).
pub fn bad_service() {
    svc(99, 0, 0);
}

/// Registers [`halt_checked`] sets and reads back, in this order.
pub const HALT_REGS: [&str; 16] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15", "rflags",
];

// halt_checked(regs: *mut [u64; 16]): loads every general-purpose register
// but rsp, and RFLAGS, from `regs` (in HALT_REGS order; rax = the service,
// SVC_HALT or SVC_HALT_CLOBBER), calls the service gate, and stores what
// the registers hold after the wake-up back into `regs`. The callee-saved
// registers are restored from the stack, so whatever the registers held
// after the wake-up, the caller goes on unharmed.
core::arch::global_asm!(
    ".pushsection .text.halt_checked, \"ax\"",
    ".globl halt_checked",
    "halt_checked:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",
    "push qword ptr [rdi + 120]",
    "popfq",
    "mov rax, [rdi]",
    "mov rbx, [rdi + 8]",
    "mov rcx, [rdi + 16]",
    "mov rdx, [rdi + 24]",
    "mov rsi, [rdi + 32]",
    "mov rbp, [rdi + 48]",
    "mov r8, [rdi + 56]",
    "mov r9, [rdi + 64]",
    "mov r10, [rdi + 72]",
    "mov r11, [rdi + 80]",
    "mov r12, [rdi + 88]",
    "mov r13, [rdi + 96]",
    "mov r14, [rdi + 104]",
    "mov r15, [rdi + 112]",
    "mov rdi, [rdi + 40]",
    "call {gate}",
    "pushfq",
    "push rdi",
    "mov rdi, [rsp + 16]",
    "mov [rdi], rax",
    "mov [rdi + 8], rbx",
    "mov [rdi + 16], rcx",
    "mov [rdi + 24], rdx",
    "mov [rdi + 32], rsi",
    "mov [rdi + 48], rbp",
    "mov [rdi + 56], r8",
    "mov [rdi + 64], r9",
    "mov [rdi + 72], r10",
    "mov [rdi + 80], r11",
    "mov [rdi + 88], r12",
    "mov [rdi + 96], r13",
    "mov [rdi + 104], r14",
    "mov [rdi + 112], r15",
    "pop rax",
    "mov [rdi + 40], rax",
    "pop rax",
    "mov [rdi + 120], rax",
    "pop rdi",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "cld",
    "ret",
    ".popsection",
    gate = sym svc_gate,
);

unsafe extern "C" {
    fn halt_checked(regs: *mut [u64; 16]);
}

/// Sleep at CPL 0 until the next interrupt (`sti; hlt`) with every
/// general-purpose register but rsp, and RFLAGS, set from `regs` (rax: the
/// service, `SVC_HALT` or `SVC_HALT_CLOBBER`); `regs` then holds what they
/// held after the wake-up.
pub fn halt_with_regs(regs: &mut [u64; 16]) {
    // SAFETY: halt_checked saves and restores the callee-saved registers
    // and clobbers only those declared here (and the flags); it uses the
    // stack (no `nostack`: the red zone stays free).
    unsafe {
        asm!(
            "call {f}",
            f = sym halt_checked,
            inout("rdi") regs.as_mut_ptr() => _,
            out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
        );
    }
}

/// Write a LAPIC register (offset from 0xfee00000).
pub fn lapic_write(reg: u32, value: u32) {
    svc(SVC_LAPIC_WRITE, reg as u64, value as u64);
}

/// Read a LAPIC register (offset from 0xfee00000).
pub fn lapic_read(reg: u32) -> u32 {
    svc(SVC_LAPIC_READ, reg as u64, 0).0 as u32
}

/// wrmsr at CPL 0; `false` if the MSR raised #GP.
pub fn wrmsr(msr: u32, value: u64) -> bool {
    svc(SVC_WRMSR, msr as u64, value).0 == 0
}

/// rdmsr at CPL 0; `None` if the MSR raised #GP.
pub fn rdmsr(msr: u32) -> Option<u64> {
    let (rax, rcx, _, _) = svc(SVC_RDMSR, msr as u64, 0);
    (rcx == 0).then_some(rax)
}

/// CPUID executed at CPL 0, i.e. as the VMM configured it
/// (at CPL 3 kvm-pvm may run it natively and show the host's).
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let (a, c, d, b) = svc(SVC_CPUID, leaf as u64, subleaf as u64);
    [a as u32, b as u32, c as u32, d as u32]
}

/// Read the TSC.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc is allowed at CPL 3 (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Read the TSC after all earlier loads have completed.
#[inline(always)]
pub fn rdtsc_ordered() -> u64 {
    // SAFETY: lfence and rdtsc have no side effects.
    unsafe {
        core::arch::x86_64::_mm_lfence();
        core::arch::x86_64::_rdtsc()
    }
}

/// `rdtscp`: (TSC, TSC_AUX).
#[inline(always)]
pub fn rdtscp() -> (u64, u32) {
    let mut aux = 0u32;
    // SAFETY: only called when CPUID reports RDTSCP.
    let t = unsafe { core::arch::x86_64::__rdtscp(&mut aux) };
    (t, aux)
}

/// Port output (the TSS I/O bitmap lets ring 3 use a few ports).
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O to devices this guest owns.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, nomem)) };
}

/// 32-bit port output.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: port I/O to devices this guest owns.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, nomem)) };
}

/// Port input.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O to devices this guest owns.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nostack, nomem)) };
    v
}

/// Power off (code 0) or report a fatal error (non-zero) through port 0xf4.
pub fn exit(code: u32) -> ! {
    outl(0xf4, code);
    loop {
        core::hint::spin_loop();
    }
}

/// Read XCR0 (allowed at CPL 3 once CR4.OSXSAVE is set).
pub fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: CR4.OSXSAVE is set by the boot code.
    unsafe { asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nostack, nomem)) };
    (hi as u64) << 32 | lo as u64
}

/// Read the qword at FS base + 0 and GS base + 0.
pub fn fs_gs_words() -> (u64, u64) {
    let (f, g): (u64, u64);
    // SAFETY: FS/GS bases point at this CPU's KernelCpu words (checked by the caller,
    // which only compares the values).
    unsafe {
        asm!("mov {f}, qword ptr fs:[0]", "mov {g}, qword ptr gs:[0]",
             f = out(reg) f, g = out(reg) g, options(nostack, readonly, preserves_flags));
    }
    (f, g)
}

/// Number of ymm registers whose upper halves hold known constants
/// (ymm0..ymm14; ymm15's upper half holds the progress counter, see
/// [`ymm15_load_upper`]).
pub const YMM_REGS: usize = 15;

/// Load `vals[k]` into bits 255:128 of ymm`k`, k < 15 (bits 127:0 are
/// preserved, so whatever the compiler keeps in xmm`k` is untouched).
#[inline(never)]
pub fn ymm_load_upper(vals: &[[u64; 2]; YMM_REGS]) {
    // SAFETY: only the upper halves change; compiled code never reads them
    // (it is built without AVX, so it uses legacy-SSE encodings only).
    unsafe {
        asm!(
            "vinsertf128 ymm0, ymm0, xmmword ptr [{p}], 1",
            "vinsertf128 ymm1, ymm1, xmmword ptr [{p} + 16], 1",
            "vinsertf128 ymm2, ymm2, xmmword ptr [{p} + 32], 1",
            "vinsertf128 ymm3, ymm3, xmmword ptr [{p} + 48], 1",
            "vinsertf128 ymm4, ymm4, xmmword ptr [{p} + 64], 1",
            "vinsertf128 ymm5, ymm5, xmmword ptr [{p} + 80], 1",
            "vinsertf128 ymm6, ymm6, xmmword ptr [{p} + 96], 1",
            "vinsertf128 ymm7, ymm7, xmmword ptr [{p} + 112], 1",
            "vinsertf128 ymm8, ymm8, xmmword ptr [{p} + 128], 1",
            "vinsertf128 ymm9, ymm9, xmmword ptr [{p} + 144], 1",
            "vinsertf128 ymm10, ymm10, xmmword ptr [{p} + 160], 1",
            "vinsertf128 ymm11, ymm11, xmmword ptr [{p} + 176], 1",
            "vinsertf128 ymm12, ymm12, xmmword ptr [{p} + 192], 1",
            "vinsertf128 ymm13, ymm13, xmmword ptr [{p} + 208], 1",
            "vinsertf128 ymm14, ymm14, xmmword ptr [{p} + 224], 1",
            p = in(reg) vals.as_ptr(),
            options(nostack, readonly, preserves_flags)
        );
    }
}

/// Store bits 255:128 of ymm0..ymm14 (no register is modified).
#[inline(never)]
pub fn ymm_store_upper(out: &mut [[u64; 2]; YMM_REGS]) {
    // SAFETY: stores to `out` only.
    unsafe {
        asm!(
            "vextractf128 xmmword ptr [{p}], ymm0, 1",
            "vextractf128 xmmword ptr [{p} + 16], ymm1, 1",
            "vextractf128 xmmword ptr [{p} + 32], ymm2, 1",
            "vextractf128 xmmword ptr [{p} + 48], ymm3, 1",
            "vextractf128 xmmword ptr [{p} + 64], ymm4, 1",
            "vextractf128 xmmword ptr [{p} + 80], ymm5, 1",
            "vextractf128 xmmword ptr [{p} + 96], ymm6, 1",
            "vextractf128 xmmword ptr [{p} + 112], ymm7, 1",
            "vextractf128 xmmword ptr [{p} + 128], ymm8, 1",
            "vextractf128 xmmword ptr [{p} + 144], ymm9, 1",
            "vextractf128 xmmword ptr [{p} + 160], ymm10, 1",
            "vextractf128 xmmword ptr [{p} + 176], ymm11, 1",
            "vextractf128 xmmword ptr [{p} + 192], ymm12, 1",
            "vextractf128 xmmword ptr [{p} + 208], ymm13, 1",
            "vextractf128 xmmword ptr [{p} + 224], ymm14, 1",
            p = in(reg) out.as_mut_ptr(),
            options(nostack, preserves_flags)
        );
    }
}

/// Load `val` into bits 255:128 of ymm15 (the register copy of the
/// progress counter; bits 127:0 are preserved).
#[inline(never)]
pub fn ymm15_load_upper(val: &[u64; 2]) {
    // SAFETY: as for ymm_load_upper: only ymm15's upper half changes.
    unsafe {
        asm!(
            "vinsertf128 ymm15, ymm15, xmmword ptr [{p}], 1",
            p = in(reg) val.as_ptr(),
            options(nostack, readonly, preserves_flags)
        );
    }
}

/// Store bits 255:128 of ymm15 (no register is modified).
#[inline(never)]
pub fn ymm15_store_upper() -> [u64; 2] {
    let mut out = [0u64; 2];
    // SAFETY: stores 16 bytes to `out` only.
    unsafe {
        asm!(
            "vextractf128 xmmword ptr [{p}], ymm15, 1",
            p = in(reg) out.as_mut_ptr(),
            options(nostack, preserves_flags)
        );
    }
    out
}

/// Number of x87 registers holding known values (one slot stays free so
/// `fld st(i)` can copy a register out without overflowing the stack).
pub const X87_REGS: usize = 7;

/// An 80-bit x87 value: (significand, sign|exponent).
pub type F80 = (u64, u16);

/// Empty the x87 stack, set the control word and push `vals[0]..vals[6]`
/// (so st(i) ends up holding `vals[6 - i]`).
pub fn x87_load(fcw: u16, vals: &[F80; X87_REGS]) {
    let mut buf = [0u8; 10 * X87_REGS];
    for (i, (m, e)) in vals.iter().enumerate() {
        buf[i * 10..i * 10 + 8].copy_from_slice(&m.to_le_bytes());
        buf[i * 10 + 8..i * 10 + 10].copy_from_slice(&e.to_le_bytes());
    }
    // SAFETY: x87 state is owned by this workload; compiled code never uses it.
    unsafe {
        asm!(
            "fninit",
            "fldcw word ptr [{cw}]",
            "fld tbyte ptr [{p}]",
            "fld tbyte ptr [{p} + 10]",
            "fld tbyte ptr [{p} + 20]",
            "fld tbyte ptr [{p} + 30]",
            "fld tbyte ptr [{p} + 40]",
            "fld tbyte ptr [{p} + 50]",
            "fld tbyte ptr [{p} + 60]",
            cw = in(reg) &fcw,
            p = in(reg) buf.as_ptr(),
            options(nostack, readonly)
        );
    }
}

/// Copy st(0)..st(6) out without changing the stack; returns them with the
/// control word.
pub fn x87_store() -> ([F80; X87_REGS], u16) {
    let mut buf = [0u8; 10 * X87_REGS];
    let mut fcw = 0u16;
    // SAFETY: each `fld st(i)` is undone by the `fstp` that follows.
    unsafe {
        asm!(
            "fnstcw word ptr [{cw}]",
            "fld st(0)", "fstp tbyte ptr [{p}]",
            "fld st(1)", "fstp tbyte ptr [{p} + 10]",
            "fld st(2)", "fstp tbyte ptr [{p} + 20]",
            "fld st(3)", "fstp tbyte ptr [{p} + 30]",
            "fld st(4)", "fstp tbyte ptr [{p} + 40]",
            "fld st(5)", "fstp tbyte ptr [{p} + 50]",
            "fld st(6)", "fstp tbyte ptr [{p} + 60]",
            cw = in(reg) &mut fcw,
            p = in(reg) buf.as_mut_ptr(),
            options(nostack)
        );
    }
    let mut vals = [(0u64, 0u16); X87_REGS];
    for (i, v) in vals.iter_mut().enumerate() {
        let mut m = [0u8; 8];
        m.copy_from_slice(&buf[i * 10..i * 10 + 8]);
        *v = (
            u64::from_le_bytes(m),
            u16::from_le_bytes([buf[i * 10 + 8], buf[i * 10 + 9]]),
        );
    }
    (vals, fcw)
}

/// Write MXCSR.
pub fn ldmxcsr(v: u32) {
    // SAFETY: changes only rounding/denormal modes, which integer code ignores.
    unsafe { asm!("ldmxcsr dword ptr [{p}]", p = in(reg) &v, options(nostack, readonly)) };
}

/// Read MXCSR.
pub fn stmxcsr() -> u32 {
    let mut v = 0u32;
    // SAFETY: stores 4 bytes to `v`.
    unsafe { asm!("stmxcsr dword ptr [{p}]", p = in(reg) &mut v, options(nostack)) };
    v
}
