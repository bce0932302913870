//! The opening exchange: the source says Hello (version, capabilities, VM
//! configuration); the destination answers Accept or Refuse with a reason
//! before any memory moves.

use std::io::{Read, Write};

use wire::{BootSpec, Message, VmDescriptor, MAGIC, PROTOCOL_VERSION};

use crate::{Error, Result};

/// Capabilities this build supports.
pub const CAPABILITIES: &[&str] = &[
    "zero-ranges",
    "precopy",
    "xbzrle",
    "zstd",
    "multifd",
    "sync",
    "boot-spec",
    "go-paused",
];

/// A Hello as the destination sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// VM name.
    pub name: String,
    /// Guest RAM bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Migration mode.
    pub mode: String,
    /// Source capabilities.
    pub capabilities: Vec<String>,
    /// The whole descriptor.
    pub vm: VmDescriptor,
}

/// Destination: reads and validates the Hello (magic and version). One this
/// host cannot take (another protocol version, not a migd stream, another
/// message, bytes that do not decode) is answered with a `Refuse` naming why,
/// so that the source reports the reason, not a closed stream.
pub fn receive_hello(stream: &mut (impl Read + Write)) -> Result<Hello> {
    let hello = read_hello(stream);
    if let Err(e) = &hello {
        // A stream that failed takes no answer.
        if !matches!(e, Error::Wire(wire::WireError::Io(_))) {
            let _ = refuse(stream, &e.to_string());
        }
    }
    hello
}

fn read_hello(stream: &mut impl Read) -> Result<Hello> {
    match wire::expect_control(stream, "Hello")? {
        Message::Hello {
            magic,
            version,
            capabilities,
            mode,
            vm,
        } => {
            if magic != MAGIC {
                return Err(Error::Protocol(
                    "not a migd migration stream (bad magic)".into(),
                ));
            }
            if version != PROTOCOL_VERSION {
                return Err(Error::Protocol(format!(
                    "protocol version {version} is not supported (this host speaks {PROTOCOL_VERSION})"
                )));
            }
            Ok(Hello {
                name: vm.name.clone(),
                memory: vm.memory,
                vcpus: vm.vcpus,
                mode,
                capabilities,
                vm,
            })
        }
        other => Err(Error::Protocol(format!(
            "expected Hello, got {}",
            other.name()
        ))),
    }
}

/// Destination: accepts; returns the capabilities both sides share.
pub fn accept(stream: &mut impl Write, hello: &Hello) -> Result<Vec<String>> {
    // Ours that the source named, each once, however often it named them.
    let shared: Vec<String> = CAPABILITIES
        .iter()
        .filter(|c| hello.capabilities.iter().any(|h| h == *c))
        .map(|c| c.to_string())
        .collect();
    wire::write_control(
        stream,
        &Message::Accept {
            version: PROTOCOL_VERSION,
            capabilities: shared.clone(),
        },
    )?;
    Ok(shared)
}

/// Destination, after [`accept`]: the source's boot spec of the VM where
/// both sides share `boot-spec` (the source sends it right after Accept).
pub fn receive_boot(stream: &mut impl Read, shared: &[String]) -> Result<Option<BootSpec>> {
    if !shared.iter().any(|c| c == "boot-spec") {
        return Ok(None);
    }
    match wire::expect_control(stream, "Boot")? {
        Message::Boot { spec } => {
            if let Some(s) = &spec {
                s.check()?;
            }
            Ok(spec)
        }
        other => Err(Error::Protocol(format!(
            "expected Boot, got {}",
            other.name()
        ))),
    }
}

/// Destination: refuses with a reason.
pub fn refuse(stream: &mut impl Write, reason: &str) -> Result<()> {
    wire::write_control(
        stream,
        &Message::Refuse {
            reason: reason.to_string(),
        },
    )?;
    Ok(())
}

/// Source: sends Hello and waits for the answer; returns the shared capabilities.
pub fn hello<S: Read + Write>(stream: &mut S, mode: &str, vm: VmDescriptor) -> Result<Vec<String>> {
    hello_then(stream, mode, vm, None, CAPABILITIES, || {})
}

/// [`hello`] offering `capabilities` (a subset of [`CAPABILITIES`]) and,
/// once accepted with `boot-spec`, the VM's `boot` spec; calls `between`
/// after the Hello is sent (a fault-injection hook).
pub fn hello_then<S: Read + Write>(
    stream: &mut S,
    mode: &str,
    vm: VmDescriptor,
    boot: Option<BootSpec>,
    capabilities: &[&str],
    between: impl FnOnce(),
) -> Result<Vec<String>> {
    wire::write_control(
        stream,
        &Message::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            capabilities: capabilities.iter().map(|s| s.to_string()).collect(),
            mode: mode.to_string(),
            vm,
        },
    )?;
    between();
    match wire::expect_control(stream, "Accept or Refuse").map_err(not_migd)? {
        Message::Accept {
            version,
            capabilities,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(Error::Protocol(format!(
                    "destination speaks protocol version {version}, this host {PROTOCOL_VERSION}"
                )));
            }
            if capabilities.iter().any(|c| c == "boot-spec") {
                // A spec the destination would refuse goes as none: it is
                // not worth failing the migration for.
                let spec = boot.filter(|b| b.check().is_ok());
                wire::write_control(stream, &Message::Boot { spec })?;
            }
            Ok(capabilities)
        }
        Message::Refuse { reason } => Err(Error::Refused(reason)),
        other => Err(Error::Protocol(format!(
            "expected Accept or Refuse, got {}",
            other.name()
        ))),
    }
}

/// The error of an answer to the Hello that does not frame as migd's: the
/// peer is something else (an SSH or HTTP server, say), named by the bytes
/// it began with.
fn not_migd(e: wire::WireError) -> Error {
    let began = match &e {
        wire::WireError::FrameSize(len) => {
            let text: String = String::from_utf8_lossy(&(*len as u32).to_le_bytes())
                .chars()
                .map(|c| {
                    if c.is_ascii_graphic() || c == ' ' {
                        c
                    } else {
                        '.'
                    }
                })
                .collect();
            format!("its answer began \"{text}\"; ")
        }
        wire::WireError::UnknownKind(_) => String::new(),
        _ => return e.into(),
    };
    Error::Protocol(format!(
        "the peer is not a migd migration listener ({began}{e})"
    ))
}

/// Source: waits until the destination has built the VM (so that its set-up
/// time never lands in the downtime).
pub fn wait_prepared(stream: &mut impl Read) -> Result<()> {
    match wire::expect_control(stream, "Prepared")? {
        Message::Prepared => Ok(()),
        Message::Cancel { reason } => Err(Error::PeerCancelled(reason)),
        other => Err(Error::Protocol(format!(
            "expected Prepared, got {}",
            other.name()
        ))),
    }
}

/// Why this host cannot run the VM `vm` describes (its vendor and CPU
/// features), if it cannot: what a migration's destination checks on the
/// Hello.
pub fn host_cannot_run(vm: &VmDescriptor) -> Option<String> {
    match vmm::cpuid::host_supported() {
        Ok(host) => cpu_incompatibility(vm, &host),
        Err(e) => Some(format!("this host cannot run VMs: {e}")),
    }
}

/// [`host_cannot_run`] for a VM that comes another way than a migration
/// (a snapshot): the CPUID its vCPUs were captured with decides, each
/// vCPU's (a file may hold vCPUs that differ).
pub fn check_runs_here(state: &vmm::VmState) -> Result<()> {
    let why = state
        .vcpus
        .iter()
        .find_map(|v| host_cannot_run(&describe("", &v.cpuid, state.memory, 0)));
    match why {
        Some(why) => Err(Error::Invalid(format!(
            "this host cannot run the VM: {why}"
        ))),
        None => Ok(()),
    }
}

/// A CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn of(self, e: &kvm_bindings::kvm_cpuid_entry2) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        }
    }
}

/// How the destination compares a word of [`CPU_WORDS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compare {
    /// Feature bits: every bit the guest has (outside the mask) must be the
    /// host's too. The mask leaves out bits that are not capabilities: ones
    /// that reflect the guest's own state (OSXSAVE, OSPKE: its CR4; APIC:
    /// its APIC base MSR), that we set ourselves (hypervisor), or that
    /// announce something taken away (FCS/FDS deprecated), which a host
    /// without them does not miss.
    Bits { ignore: u32 },
    /// The physical address width (bits 7:0): the host's must reach every
    /// address the guest's RAM and devices use. Not the whole width its
    /// CPUID names: hosts of one model differ there by a few bits (memory
    /// encryption takes some), and QEMU lets such a guest move too.
    AddressBits,
}

/// One word of [`VmDescriptor::cpu_features`].
struct CpuWord {
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    compare: Compare,
    /// Bit number and name of the features that have a common name.
    names: &'static [(u32, &'static str)],
}

const fn bits(
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    ignore: u32,
    names: &'static [(u32, &'static str)],
) -> CpuWord {
    CpuWord {
        leaf,
        subleaf,
        reg,
        compare: Compare::Bits { ignore },
        names,
    }
}

/// The words of [`VmDescriptor::cpu_features`], in their order on the wire:
/// each CPUID register as the guest was given it, zero where its CPUID has
/// no such leaf. The first five are the ones builds before this one sent
/// (and compared, position by position): new words are only ever appended.
/// A descriptor shorter than this list (from an older source) leaves the
/// words it lacks unchecked; a host's own CPUID always gives them all, so
/// a leaf the host lacks counts as all zero, never as nothing to check.
const CPU_WORDS: &[CpuWord] = &[
    bits(1, 0, Reg::Ecx, (1 << 27) | (1 << 31), LEAF1_ECX),
    bits(1, 0, Reg::Edx, 1 << 9, LEAF1_EDX),
    bits(7, 0, Reg::Ebx, (1 << 6) | (1 << 13), LEAF7_EBX),
    bits(7, 0, Reg::Ecx, 1 << 4, LEAF7_ECX),
    bits(7, 0, Reg::Edx, 0, LEAF7_EDX),
    bits(7, 1, Reg::Eax, 0, LEAF7_1_EAX),
    bits(7, 1, Reg::Edx, 0, LEAF7_1_EDX),
    // The state components XCR0 may enable (bits 0-31, 32-63).
    bits(0xd, 0, Reg::Eax, 0, XCR0),
    bits(0xd, 0, Reg::Edx, 0, &[]),
    bits(0xd, 1, Reg::Eax, 0, LEAFD_1_EAX),
    // The state components IA32_XSS may enable.
    bits(0xd, 1, Reg::Ecx, 0, XSS),
    bits(0xd, 1, Reg::Edx, 0, &[]),
    bits(0x8000_0001, 0, Reg::Ecx, 0, EXT1_ECX),
    // Bit 9 is AMD's copy of leaf 1's APIC bit.
    bits(0x8000_0001, 0, Reg::Edx, 1 << 9, EXT1_EDX),
    // Only the invariant TSC: the rest is power management.
    bits(0x8000_0007, 0, Reg::Edx, !(1 << 8), &[(8, "invariant TSC")]),
    CpuWord {
        leaf: 0x8000_0008,
        subleaf: 0,
        reg: Reg::Eax,
        compare: Compare::AddressBits,
        names: &[],
    },
    // Hints a guest does not miss: IBRS preferred (18), IBRS same mode
    // (19), LMSLE unsupported (20). Not the "not affected" and "always on"
    // flags (SSB_NO, BTC_NO, IBRS/STIBP always on): a guest told so skips
    // its mitigations, and must not move to a host where they are needed.
    bits(
        0x8000_0008,
        0,
        Reg::Ebx,
        (1 << 18) | (1 << 19) | (1 << 20),
        EXT8_EBX,
    ),
];

/// The physical address bits that the guest-physical addresses of a VM of
/// `memory` bytes need: its RAM (above 4 GiB past the 1 GiB hole below
/// it), and at least 4 GiB (the LAPIC and IOAPIC sit just below).
fn address_bits_needed(memory: u64) -> u32 {
    let top = memory.saturating_add(1 << 30).max(1 << 32);
    64 - (top - 1).leading_zeros()
}

const LEAF1_ECX: &[(u32, &str)] = &[
    (0, "SSE3"),
    (1, "PCLMULQDQ"),
    (3, "MONITOR"),
    (5, "VMX"),
    (9, "SSSE3"),
    (12, "FMA"),
    (13, "CMPXCHG16B"),
    (15, "PDCM"),
    (17, "PCID"),
    (19, "SSE4.1"),
    (20, "SSE4.2"),
    (21, "x2APIC"),
    (22, "MOVBE"),
    (23, "POPCNT"),
    (24, "TSC deadline"),
    (25, "AES"),
    (26, "XSAVE"),
    (28, "AVX"),
    (29, "F16C"),
    (30, "RDRAND"),
];
const LEAF1_EDX: &[(u32, &str)] = &[
    (0, "FPU"),
    (3, "PSE"),
    (4, "TSC"),
    (5, "MSR"),
    (6, "PAE"),
    (7, "MCE"),
    (8, "CX8"),
    (11, "SEP"),
    (12, "MTRR"),
    (13, "PGE"),
    (14, "MCA"),
    (15, "CMOV"),
    (16, "PAT"),
    (17, "PSE-36"),
    (19, "CLFLUSH"),
    (23, "MMX"),
    (24, "FXSR"),
    (25, "SSE"),
    (26, "SSE2"),
    (28, "HTT"),
];
const LEAF7_EBX: &[(u32, &str)] = &[
    (0, "FSGSBASE"),
    (1, "TSC_ADJUST"),
    (3, "BMI1"),
    (4, "HLE"),
    (5, "AVX2"),
    (7, "SMEP"),
    (8, "BMI2"),
    (9, "ERMS"),
    (10, "INVPCID"),
    (11, "RTM"),
    (14, "MPX"),
    (16, "AVX512F"),
    (17, "AVX512DQ"),
    (18, "RDSEED"),
    (19, "ADX"),
    (20, "SMAP"),
    (21, "AVX512_IFMA"),
    (23, "CLFLUSHOPT"),
    (24, "CLWB"),
    (25, "PT"),
    (28, "AVX512CD"),
    (29, "SHA"),
    (30, "AVX512BW"),
    (31, "AVX512VL"),
];
const LEAF7_ECX: &[(u32, &str)] = &[
    (1, "AVX512_VBMI"),
    (2, "UMIP"),
    (3, "PKU"),
    (5, "WAITPKG"),
    (6, "AVX512_VBMI2"),
    (7, "CET_SS"),
    (8, "GFNI"),
    (9, "VAES"),
    (10, "VPCLMULQDQ"),
    (11, "AVX512_VNNI"),
    (12, "AVX512_BITALG"),
    (14, "AVX512_VPOPCNTDQ"),
    (16, "LA57"),
    (22, "RDPID"),
    (24, "BUS_LOCK_DETECT"),
    (25, "CLDEMOTE"),
    (27, "MOVDIRI"),
    (28, "MOVDIR64B"),
    (29, "ENQCMD"),
    (30, "SGX_LC"),
    (31, "PKS"),
];
const LEAF7_EDX: &[(u32, &str)] = &[
    (4, "FSRM"),
    (5, "UINTR"),
    (8, "AVX512_VP2INTERSECT"),
    (10, "MD_CLEAR"),
    (14, "SERIALIZE"),
    (16, "TSXLDTRK"),
    (20, "CET_IBT"),
    (22, "AMX_BF16"),
    (23, "AVX512_FP16"),
    (24, "AMX_TILE"),
    (25, "AMX_INT8"),
    (26, "SPEC_CTRL"),
    (27, "STIBP"),
    (28, "FLUSH_L1D"),
    (29, "ARCH_CAPABILITIES"),
    (30, "CORE_CAPABILITIES"),
    (31, "SSBD"),
];
const LEAF7_1_EAX: &[(u32, &str)] = &[
    (4, "AVX_VNNI"),
    (5, "AVX512_BF16"),
    (7, "CMPCCXADD"),
    (10, "FZRM"),
    (11, "FSRS"),
    (12, "FSRC"),
    (19, "WRMSRNS"),
    (21, "AMX_FP16"),
    (22, "HRESET"),
    (23, "AVX_IFMA"),
    (26, "LAM"),
];
const LEAF7_1_EDX: &[(u32, &str)] = &[
    (4, "AVX_VNNI_INT8"),
    (5, "AVX_NE_CONVERT"),
    (14, "PREFETCHITI"),
    (19, "AVX10"),
];
const XCR0: &[(u32, &str)] = &[
    (0, "x87 state"),
    (1, "SSE state"),
    (2, "AVX state"),
    (3, "MPX BNDREGS state"),
    (4, "MPX BNDCSR state"),
    (5, "AVX-512 opmask state"),
    (6, "AVX-512 ZMM_Hi256 state"),
    (7, "AVX-512 Hi16_ZMM state"),
    (9, "PKRU state"),
    (17, "AMX TILECFG state"),
    (18, "AMX TILEDATA state"),
];
const LEAFD_1_EAX: &[(u32, &str)] = &[
    (0, "XSAVEOPT"),
    (1, "XSAVEC"),
    (2, "XGETBV1"),
    (3, "XSAVES"),
    (4, "XFD"),
];
const XSS: &[(u32, &str)] = &[
    (8, "PT state"),
    (10, "PASID state"),
    (11, "CET user state"),
    (12, "CET supervisor state"),
    (13, "HDC state"),
    (14, "UINTR state"),
    (15, "LBR state"),
    (16, "HWP state"),
];
const EXT1_ECX: &[(u32, &str)] = &[
    (0, "LAHF/SAHF"),
    (2, "SVM"),
    (4, "CR8_LEGACY"),
    (5, "LZCNT"),
    (6, "SSE4A"),
    (7, "MISALIGNSSE"),
    (8, "PREFETCHW"),
    (11, "XOP"),
    (16, "FMA4"),
    (21, "TBM"),
    (22, "TOPOEXT"),
    (23, "PERFCTR_CORE"),
    (29, "MWAITX"),
];
const EXT1_EDX: &[(u32, &str)] = &[
    (11, "SYSCALL"),
    (20, "NX"),
    (22, "MMXEXT"),
    (25, "FXSR_OPT"),
    (26, "1 GiB pages"),
    (27, "RDTSCP"),
    (29, "LM"),
];
const EXT8_EBX: &[(u32, &str)] = &[
    (0, "CLZERO"),
    (1, "IRPERF"),
    (2, "XSAVEERPTR"),
    (4, "RDPRU"),
    (9, "WBNOINVD"),
    (12, "IBPB"),
    (14, "IBRS"),
    (15, "STIBP"),
    (24, "SSBD"),
    (25, "VIRT_SSBD"),
    (26, "SSB_NO"),
    (29, "BTC_NO"),
];

impl CpuWord {
    /// `CPUID 0x80000001 ECX`, `CPUID 0x7.1 EAX`: leaves 7 and 0xD are read by subleaf.
    fn label(&self) -> String {
        match self.leaf {
            7 | 0xd => format!(
                "CPUID {:#x}.{} {}",
                self.leaf,
                self.subleaf,
                self.reg.name()
            ),
            _ => format!("CPUID {:#x} {}", self.leaf, self.reg.name()),
        }
    }

    /// `5 (LZCNT)`, or `17` for a bit without a name here.
    fn bit(&self, bit: u32) -> String {
        match self.names.iter().find(|(b, _)| *b == bit) {
            Some((_, name)) => format!("{bit} ({name})"),
            None => bit.to_string(),
        }
    }
}

/// The descriptor of a VM: name, size, vCPUs and the CPU features it was
/// given ([`CPU_WORDS`]).
pub fn describe(
    name: &str,
    state_cpuid: &[kvm_bindings::kvm_cpuid_entry2],
    memory: u64,
    vcpus: usize,
) -> VmDescriptor {
    let leaf = |f: u32, i: u32| state_cpuid.iter().find(|e| e.function == f && e.index == i);
    let vendor = leaf(0, 0)
        .map(|e| {
            let mut b = Vec::with_capacity(12);
            for r in [e.ebx, e.edx, e.ecx] {
                b.extend_from_slice(&r.to_le_bytes());
            }
            String::from_utf8_lossy(&b).into_owned()
        })
        .unwrap_or_default();
    let features = CPU_WORDS
        .iter()
        .map(|w| leaf(w.leaf, w.subleaf).map_or(0, |e| w.reg.of(e)))
        .collect();
    VmDescriptor {
        name: name.to_string(),
        memory,
        vcpus: vcpus as u32,
        cpu_vendor: vendor,
        cpu_features: features,
    }
}

/// Destination check: can this host's CPU run a guest that was given `vm`'s features?
/// Returns the reason if not, naming each CPUID register and bit the host lacks.
pub fn cpu_incompatibility(
    vm: &VmDescriptor,
    host_cpuid: &[kvm_bindings::kvm_cpuid_entry2],
) -> Option<String> {
    let host = describe("", host_cpuid, 0, 0);
    if !vm.cpu_vendor.is_empty() && vm.cpu_vendor != host.cpu_vendor {
        return Some(format!(
            "CPU vendor {} differs from this host's {}",
            vm.cpu_vendor, host.cpu_vendor
        ));
    }
    let mut lacks = Vec::new();
    let mut short = Vec::new();
    // An older source sends fewer words: those it did not send are unknown.
    for ((word, &want), &have) in CPU_WORDS
        .iter()
        .zip(&vm.cpu_features)
        .zip(&host.cpu_features)
    {
        match word.compare {
            Compare::Bits { ignore } => {
                let missing = want & !have & !ignore;
                if missing != 0 {
                    let bits: Vec<String> = (0..32)
                        .filter(|b| missing & (1 << b) != 0)
                        .map(|b| word.bit(b))
                        .collect();
                    let s = if bits.len() == 1 { "" } else { "s" };
                    lacks.push(format!("{} bit{s} {}", word.label(), bits.join(", ")));
                }
            }
            Compare::AddressBits => {
                let have = have & 0xff;
                let need = (want & 0xff).min(address_bits_needed(vm.memory));
                if have < need {
                    short.push(format!(
                        "this host's CPU has {have}-bit physical addresses ({} bits 7:0), the \
                         guest's memory needs {need}: it could not map all of the guest's addresses",
                        word.label()
                    ));
                }
            }
        }
    }
    if !lacks.is_empty() {
        short.insert(
            0,
            format!(
                "this host's CPU lacks features the guest uses: {}",
                lacks.join("; ")
            ),
        );
    }
    (!short.is_empty()).then(|| short.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc() -> VmDescriptor {
        VmDescriptor {
            name: "web1".into(),
            memory: 1 << 30,
            vcpus: 2,
            cpu_vendor: "GenuineIntel".into(),
            cpu_features: vec![0, 0],
        }
    }

    fn hello_bytes(magic: [u8; 8], version: u32) -> Vec<u8> {
        wire::encode_control(&Message::Hello {
            magic,
            version,
            capabilities: vec!["precopy".into(), "future-thing".into()],
            mode: "precopy".into(),
            vm: desc(),
        })
        .unwrap()
    }

    /// The destination's side: what `receive_hello` makes of `bytes`, and
    /// the answer it wrote.
    fn receive(bytes: &[u8]) -> (Result<Hello>, Vec<u8>) {
        let mut d = Duplex(Vec::new(), std::io::Cursor::new(bytes.to_vec()));
        (receive_hello(&mut d), d.0)
    }

    #[test]
    fn good_hello_is_accepted_with_shared_capabilities() {
        let (h, answer) = receive(&hello_bytes(MAGIC, PROTOCOL_VERSION));
        let h = h.unwrap();
        assert!(answer.is_empty(), "no answer before the host's own checks");
        assert_eq!(h.name, "web1");
        let mut out = Vec::new();
        assert_eq!(accept(&mut out, &h).unwrap(), vec!["precopy".to_string()]);
        match wire::decode_frame(&out).unwrap() {
            wire::Frame::Control(Message::Accept { capabilities, .. }) => {
                assert_eq!(capabilities, vec!["precopy".to_string()])
            }
            f => panic!("{f:?}"),
        }
        // Named many times, echoed once.
        let mut h = h;
        h.capabilities = vec!["precopy".into(); 1000];
        assert_eq!(
            accept(&mut Vec::new(), &h).unwrap(),
            vec!["precopy".to_string()]
        );
    }

    #[test]
    fn bad_hellos_name_the_problem_to_the_source_too() {
        // Each refused with the reason the destination's error gives.
        let refused = |bytes: &[u8], what: &str| {
            let (e, answer) = receive(bytes);
            let e = e.unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
            match wire::decode_frame(&answer) {
                Ok(wire::Frame::Control(Message::Refuse { reason })) => assert_eq!(reason, e),
                other => panic!("answer to {what}: {other:?}"),
            }
        };
        refused(&hello_bytes(MAGIC, 99), "protocol version 99");
        refused(&hello_bytes(*b"NOTMIGD!", 1), "bad magic");
        refused(&[0xff, 0xff, 0xff, 0xff, 1], "outside");
        refused(
            &wire::encode_control(&Message::Go).unwrap(),
            "expected Hello, got Go",
        );
        let random: Vec<u8> = (0..200u32).map(|i| (i * 7919 % 251) as u8).collect();
        assert!(receive(&random).0.is_err());
        // A stream cut short takes no answer.
        let full = hello_bytes(MAGIC, 1);
        let (e, answer) = receive(&full[..full.len() / 2]);
        assert!(e.unwrap_err().to_string().contains("stream"), "truncated");
        assert!(answer.is_empty());
    }

    /// What the source writes (0), and the destination's answers it reads (1).
    struct Duplex(Vec<u8>, std::io::Cursor<Vec<u8>>);
    impl std::io::Write for Duplex {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl std::io::Read for Duplex {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.1.read(b)
        }
    }

    #[test]
    fn a_peer_that_is_not_migd_is_named_so() {
        let mut d = Duplex(
            Vec::new(),
            std::io::Cursor::new(b"SSH-2.0-OpenSSH_9.2\r\n".to_vec()),
        );
        let e = hello(&mut d, "precopy", desc()).unwrap_err().to_string();
        assert!(e.contains("not a migd migration listener"), "{e}");
        assert!(e.contains("\"SSH-\""), "{e}");
    }

    #[test]
    fn refusal_reaches_the_source() {
        // The source reads a Refuse: the error carries the destination's reason.
        let mut answer = Vec::new();
        refuse(&mut answer, "VM name web1 exists here").unwrap();
        let mut d = Duplex(Vec::new(), std::io::Cursor::new(answer));
        let e = hello(&mut d, "precopy", desc()).unwrap_err();
        assert!(e.to_string().contains("web1 exists"), "{e}");
        assert!(receive(&d.0).0.is_ok(), "the source sent a valid Hello");
    }

    #[test]
    fn source_sends_its_boot_spec_after_the_accept_unless_it_is_unfit() {
        let accepted = |caps: &[&str]| {
            wire::encode_control(&Message::Accept {
                version: PROTOCOL_VERSION,
                capabilities: caps.iter().map(|c| c.to_string()).collect(),
            })
            .unwrap()
        };
        let spec = BootSpec {
            kernel: "/images/vmlinux".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
        };
        let unfit = BootSpec {
            cmdline: "x".repeat(BootSpec::MAX_LEN + 1),
            ..spec.clone()
        };
        for (caps, boot, sent) in [
            (
                &["precopy", "boot-spec"][..],
                Some(spec.clone()),
                Some(Some(spec.clone())),
            ),
            (&["precopy", "boot-spec"][..], Some(unfit), Some(None)),
            (&["precopy"][..], Some(spec.clone()), None),
        ] {
            let mut d = Duplex(Vec::new(), std::io::Cursor::new(accepted(caps)));
            let shared = hello_then(&mut d, "precopy", desc(), boot, CAPABILITIES, || {}).unwrap();
            let mut out = &d.0[..];
            read_hello(&mut out).unwrap();
            let got = match receive_boot(&mut out, &shared) {
                Ok(b) if shared.iter().any(|c| c == "boot-spec") => Some(b),
                Ok(_) => None,
                Err(e) => panic!("{e}"),
            };
            assert_eq!(got, sent, "{caps:?}");
            assert!(out.is_empty(), "nothing else was sent");
        }
    }

    #[test]
    fn boot_spec_follows_the_accept_where_both_share_it() {
        let spec = BootSpec {
            kernel: "/images/vmlinux".into(),
            initrd: Some("/images/initrd".into()),
            cmdline: "console=ttyS0".into(),
        };
        let shared = vec!["precopy".to_string(), "boot-spec".to_string()];
        let sent = wire::encode_control(&Message::Boot {
            spec: Some(spec.clone()),
        })
        .unwrap();
        assert_eq!(
            receive_boot(&mut &sent[..], &shared).unwrap(),
            Some(spec.clone())
        );
        // Not shared: nothing is read.
        assert_eq!(receive_boot(&mut &[][..], &shared[..1]).unwrap(), None);
        // Something else where the Boot belongs, or a spec out of bounds.
        let go = wire::encode_control(&Message::Go).unwrap();
        let e = receive_boot(&mut &go[..], &shared).unwrap_err();
        assert!(e.to_string().contains("expected Boot, got Go"), "{e}");
        let long = wire::encode_control(&Message::Boot {
            spec: Some(BootSpec {
                cmdline: "x".repeat(BootSpec::MAX_LEN + 1),
                ..spec.clone()
            }),
        })
        .unwrap();
        let e = receive_boot(&mut &long[..], &shared).unwrap_err();
        assert!(e.to_string().contains("command line of 4097 bytes"), "{e}");
        let nul = wire::encode_control(&Message::Boot {
            spec: Some(BootSpec {
                kernel: "/images/\0vmlinux".into(),
                ..spec
            }),
        })
        .unwrap();
        let e = receive_boot(&mut &nul[..], &shared).unwrap_err();
        assert!(e.to_string().contains("kernel path holds a NUL"), "{e}");
    }

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_bindings::kvm_cpuid_entry2 {
        let [eax, ebx, ecx, edx] = regs;
        kvm_bindings::kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// A host's supported CPUID with every bit of every compared register
    /// set, 48-bit physical addresses.
    fn rich_host() -> Vec<kvm_bindings::kvm_cpuid_entry2> {
        let all = u32::MAX;
        let intel = [0x20, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]; // "GenuineIntel"
        vec![
            entry(0, 0, intel),
            entry(1, 0, [0x906ea, 0x0010_0800, all, all]),
            entry(7, 0, [1, all, all, all]),
            entry(7, 1, [all, 0, 0, all]),
            entry(0xd, 0, [all, 0x340, 0xa88, all]),
            entry(0xd, 1, [all, 0x340, all, all]),
            entry(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, all, all]),
            entry(0x8000_0007, 0, [0, 0, 0, all]),
            entry(0x8000_0008, 0, [0x3030, all, 0, 0]),
        ]
    }

    /// What a guest of `host` is given (the source's side of a migration).
    fn guest_of(host: &[kvm_bindings::kvm_cpuid_entry2]) -> VmDescriptor {
        describe(
            "web1",
            &vmm::cpuid::for_vcpu(host, 0, 2, 2_000_000),
            1 << 30,
            2,
        )
    }

    fn reg_mut(
        cpuid: &mut [kvm_bindings::kvm_cpuid_entry2],
        leaf: u32,
        subleaf: u32,
        reg: Reg,
    ) -> &mut u32 {
        let e = cpuid
            .iter_mut()
            .find(|e| e.function == leaf && e.index == subleaf)
            .unwrap();
        match reg {
            Reg::Eax => &mut e.eax,
            Reg::Ebx => &mut e.ebx,
            Reg::Ecx => &mut e.ecx,
            Reg::Edx => &mut e.edx,
        }
    }

    #[test]
    fn a_guest_runs_on_its_own_host() {
        let host = rich_host();
        assert_eq!(cpu_incompatibility(&guest_of(&host), &host), None);
        // The same CPUID on both sides.
        let same = describe("", &host, 0, 0);
        assert_eq!(cpu_incompatibility(&same, &host), None);
        // This machine's own KVM, where there is one: for_vcpu's changes
        // (APIC IDs, hypervisor bit, VMX/SVM hidden) are not refused.
        if let Ok(host) = vmm::cpuid::host_supported() {
            for id in 0..2 {
                let guest = describe("", &vmm::cpuid::for_vcpu(&host, id, 2, 1), 0, 0);
                assert_eq!(cpu_incompatibility(&guest, &host), None, "vCPU {id}");
            }
        }
    }

    /// A snapshot is checked vCPU by vCPU: the second one's CPUID counts
    /// (only the first one's did).
    #[test]
    fn every_vcpu_of_a_snapshot_is_checked() {
        let Ok(host) = vmm::cpuid::host_supported() else {
            return eprintln!("SKIP: no KVM");
        };
        let mut state = vmm::testing::state(64 << 20);
        state.vcpus[0].cpuid = vmm::cpuid::for_vcpu(&host, 0, 2, 1);
        let mut second = vmm::testing::state(64 << 20).vcpus.remove(0);
        second.id = 1;
        second.cpuid = vmm::cpuid::for_vcpu(&host, 1, 2, 1);
        state.vcpus.push(second);
        assert!(check_runs_here(&state).is_ok());
        for e in state.vcpus[1]
            .cpuid
            .iter_mut()
            .filter(|e| e.function == 7 && e.index == 0)
        {
            e.ebx = u32::MAX;
        }
        let e = check_runs_here(&state).unwrap_err().to_string();
        assert!(e.contains("CPUID 0x7.0 EBX"), "{e}");
    }

    #[test]
    fn each_feature_the_host_lacks_is_refused_by_name() {
        use Reg::*;
        for (leaf, subleaf, reg, bit, named) in [
            (1, 0, Ecx, 28, "CPUID 0x1 ECX bit 28 (AVX)"),
            (1, 0, Edx, 26, "CPUID 0x1 EDX bit 26 (SSE2)"),
            (7, 0, Ebx, 5, "CPUID 0x7.0 EBX bit 5 (AVX2)"),
            (7, 0, Ecx, 16, "CPUID 0x7.0 ECX bit 16 (LA57)"),
            (7, 0, Edx, 4, "CPUID 0x7.0 EDX bit 4 (FSRM)"),
            (7, 1, Eax, 4, "CPUID 0x7.1 EAX bit 4 (AVX_VNNI)"),
            (7, 1, Edx, 4, "CPUID 0x7.1 EDX bit 4 (AVX_VNNI_INT8)"),
            (0xd, 0, Eax, 2, "CPUID 0xd.0 EAX bit 2 (AVX state)"),
            (0xd, 0, Edx, 1, "CPUID 0xd.0 EDX bit 1"),
            (0xd, 1, Eax, 0, "CPUID 0xd.1 EAX bit 0 (XSAVEOPT)"),
            (0xd, 1, Eax, 1, "CPUID 0xd.1 EAX bit 1 (XSAVEC)"),
            (0xd, 1, Eax, 2, "CPUID 0xd.1 EAX bit 2 (XGETBV1)"),
            (0xd, 1, Eax, 3, "CPUID 0xd.1 EAX bit 3 (XSAVES)"),
            (0xd, 1, Ecx, 11, "CPUID 0xd.1 ECX bit 11 (CET user state)"),
            (0xd, 1, Edx, 0, "CPUID 0xd.1 EDX bit 0"),
            (
                0x8000_0001,
                0,
                Ecx,
                0,
                "CPUID 0x80000001 ECX bit 0 (LAHF/SAHF)",
            ),
            (0x8000_0001, 0, Ecx, 5, "CPUID 0x80000001 ECX bit 5 (LZCNT)"),
            (
                0x8000_0001,
                0,
                Ecx,
                8,
                "CPUID 0x80000001 ECX bit 8 (PREFETCHW)",
            ),
            (
                0x8000_0001,
                0,
                Edx,
                11,
                "CPUID 0x80000001 EDX bit 11 (SYSCALL)",
            ),
            (0x8000_0001, 0, Edx, 20, "CPUID 0x80000001 EDX bit 20 (NX)"),
            (
                0x8000_0001,
                0,
                Edx,
                26,
                "CPUID 0x80000001 EDX bit 26 (1 GiB pages)",
            ),
            (
                0x8000_0001,
                0,
                Edx,
                27,
                "CPUID 0x80000001 EDX bit 27 (RDTSCP)",
            ),
            (0x8000_0001, 0, Edx, 29, "CPUID 0x80000001 EDX bit 29 (LM)"),
            (
                0x8000_0007,
                0,
                Edx,
                8,
                "CPUID 0x80000007 EDX bit 8 (invariant TSC)",
            ),
            (
                0x8000_0008,
                0,
                Ebx,
                9,
                "CPUID 0x80000008 EBX bit 9 (WBNOINVD)",
            ),
            // A guest told it is not affected skips its mitigation.
            (
                0x8000_0008,
                0,
                Ebx,
                26,
                "CPUID 0x80000008 EBX bit 26 (SSB_NO)",
            ),
        ] {
            let guest = guest_of(&rich_host());
            let mut host = rich_host();
            *reg_mut(&mut host, leaf, subleaf, reg) &= !(1 << bit);
            let why = cpu_incompatibility(&guest, &host);
            assert_eq!(
                why.as_deref(),
                Some(format!("this host's CPU lacks features the guest uses: {named}").as_str()),
                "{named}"
            );
            // And the snapshot's check says the same.
            let state_words = describe("", &vmm::cpuid::for_vcpu(&rich_host(), 1, 2, 0), 0, 0);
            assert_eq!(cpu_incompatibility(&state_words, &host), why, "{named}");
        }
        // Several at once: each named.
        let mut host = rich_host();
        *reg_mut(&mut host, 7, 0, Reg::Ebx) &= !((1 << 5) | (1 << 8));
        *reg_mut(&mut host, 0xd, 1, Reg::Eax) &= !(1 << 3);
        assert_eq!(
            cpu_incompatibility(&guest_of(&rich_host()), &host).unwrap(),
            "this host's CPU lacks features the guest uses: CPUID 0x7.0 EBX bits 5 (AVX2), \
             8 (BMI2); CPUID 0xd.1 EAX bit 3 (XSAVES)"
        );
    }

    #[test]
    fn state_and_our_own_bits_are_not_features() {
        use Reg::*;
        // The guest's copy has them where the host's does not: OSXSAVE and
        // OSPKE (the guest's CR4), APIC (its APIC base MSR, and AMD's copy
        // of it), the hypervisor bit (ours), FDP_EXCPTN_ONLY and FCS/FDS
        // deprecated (something taken away), the power management bits of
        // 0x80000007, microcode's hints (not its "not affected" flags).
        for (leaf, subleaf, reg, bit) in [
            (1, 0, Ecx, 27),
            (1, 0, Ecx, 31),
            (1, 0, Edx, 9),
            (7, 0, Ebx, 6),
            (7, 0, Ebx, 13),
            (7, 0, Ecx, 4),
            (0x8000_0001, 0, Edx, 9),
            (0x8000_0007, 0, Edx, 7),
            // Hints and "not affected" flags of 0x80000008 EBX.
            (0x8000_0008, 0, Ebx, 18),
            (0x8000_0008, 0, Ebx, 19),
            (0x8000_0008, 0, Ebx, 20),
        ] {
            let mut host = rich_host();
            *reg_mut(&mut host, leaf, subleaf, reg) &= !(1 << bit);
            assert_eq!(
                cpu_incompatibility(&guest_of(&rich_host()), &host),
                None,
                "{leaf:#x}.{subleaf} {reg:?} bit {bit}"
            );
        }
        // What the source's for_vcpu took away (VMX, SVM) is not asked of the host.
        let mut host = rich_host();
        *reg_mut(&mut host, 1, 0, Ecx) &= !(1 << 5);
        *reg_mut(&mut host, 0x8000_0001, 0, Ecx) &= !(1 << 2);
        assert_eq!(cpu_incompatibility(&guest_of(&rich_host()), &host), None);
    }

    #[test]
    fn a_leaf_the_host_lacks_counts_as_all_zero() {
        let guest = guest_of(&rich_host());
        // No leaf 7 at all (neither subleaf).
        let mut host = rich_host();
        host.retain(|e| e.function != 7);
        let why = cpu_incompatibility(&guest, &host).unwrap();
        assert!(
            why.starts_with("this host's CPU lacks features the guest uses: CPUID 0x7.0 EBX bits 0 (FSGSBASE), 1 (TSC_ADJUST), 2, "),
            "{why}"
        );
        for word in ["0x7.0 ECX", "0x7.0 EDX", "0x7.1 EAX", "0x7.1 EDX"] {
            assert!(
                why.contains(&format!("CPUID {word} bits 0")),
                "{word}: {why}"
            );
        }
        // Nor does a guest without features need any.
        let mut plain = rich_host();
        plain.retain(|e| e.function != 7);
        assert_eq!(cpu_incompatibility(&guest_of(&plain), &host), None);
        // Without 0xD subleaf 1, or the extended leaves.
        for (leaf, subleaf, named) in [
            (
                0xd,
                1,
                "CPUID 0xd.1 EAX bits 0 (XSAVEOPT), 1 (XSAVEC), 2 (XGETBV1), 3 (XSAVES)",
            ),
            (
                0x8000_0001,
                0,
                "CPUID 0x80000001 ECX bits 0 (LAHF/SAHF), 1, 3",
            ),
            (0x8000_0007, 0, "CPUID 0x80000007 EDX bit 8 (invariant TSC)"),
        ] {
            let mut host = rich_host();
            host.retain(|e| (e.function, e.index) != (leaf, subleaf));
            let why = cpu_incompatibility(&guest, &host).unwrap();
            assert!(why.contains(named), "{named}: {why}");
        }
    }

    #[test]
    fn a_narrower_physical_address_width_is_refused() {
        // A guest of 48 bits with 1 TiB of RAM: 41 bits used.
        let mut guest = guest_of(&rich_host());
        guest.memory = 1 << 40;
        let width = |guest: &VmDescriptor, bits: u32| {
            let mut host = rich_host();
            // Bits 15:8 (linear width) are not compared.
            *reg_mut(&mut host, 0x8000_0008, 0, Reg::Eax) = 0x3000 | bits;
            cpu_incompatibility(guest, &host)
        };
        assert_eq!(width(&guest, 48), None);
        assert_eq!(width(&guest, 52), None);
        // Narrower than the guest's CPUID says, wide enough for its memory:
        // hosts of one model that differ by what memory encryption takes.
        assert_eq!(width(&guest, 43), None);
        assert_eq!(width(&guest, 41), None);
        assert_eq!(
            width(&guest, 39).unwrap(),
            "this host's CPU has 39-bit physical addresses (CPUID 0x80000008 EAX bits 7:0), \
             the guest's memory needs 41: it could not map all of the guest's addresses"
        );
        // 1 GiB: the 4 GiB below which the LAPIC sits.
        guest.memory = 1 << 30;
        assert_eq!(width(&guest, 32), None);
        assert!(width(&guest, 31).unwrap().contains("needs 32"));
        // No leaf 0x80000008 here: 0 bits.
        let mut host = rich_host();
        host.retain(|e| e.function != 0x8000_0008);
        let why = cpu_incompatibility(&guest, &host).unwrap();
        assert!(
            why.contains("0-bit physical addresses (CPUID 0x80000008 EAX bits 7:0), the guest's memory needs 32"),
            "{why}"
        );
        assert!(
            why.contains("CPUID 0x80000008 EBX bits 0 (CLZERO)"),
            "{why}"
        );
    }

    #[test]
    fn the_words_older_builds_sent_keep_their_places() {
        let host = rich_host();
        let mut guest_cpuid = vmm::cpuid::for_vcpu(&host, 0, 1, 0);
        for (i, e) in guest_cpuid.iter_mut().enumerate() {
            // Tell the registers apart.
            e.ebx ^= i as u32;
            e.ecx ^= (i as u32) << 8;
            e.edx ^= (i as u32) << 16;
        }
        let d = describe("", &guest_cpuid, 0, 0);
        let get = |f: u32, i: u32| {
            *guest_cpuid
                .iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap()
        };
        let (l1, l7) = (get(1, 0), get(7, 0));
        assert_eq!(
            d.cpu_features[..5],
            [l1.ecx, l1.edx, l7.ebx, l7.ecx, l7.edx]
        );
        assert_eq!(d.cpu_features.len(), CPU_WORDS.len());
        // An older source's five words: those are checked, the rest are unknown.
        let old = VmDescriptor {
            cpu_features: guest_of(&host).cpu_features[..5].to_vec(),
            ..desc()
        };
        let mut host = rich_host();
        *reg_mut(&mut host, 0x8000_0001, 0, Reg::Ecx) = 0;
        assert_eq!(cpu_incompatibility(&old, &host), None);
        *reg_mut(&mut host, 7, 0, Reg::Ebx) &= !(1 << 5);
        let why = cpu_incompatibility(&old, &host).unwrap();
        assert!(why.ends_with("CPUID 0x7.0 EBX bit 5 (AVX2)"), "{why}");
    }

    #[test]
    fn the_refusal_reaches_the_source_naming_the_feature() {
        let mut host = rich_host();
        *reg_mut(&mut host, 0x8000_0001, 0, Reg::Ecx) &= !(1 << 5);
        let why = cpu_incompatibility(&guest_of(&rich_host()), &host).unwrap();
        let mut answer = Vec::new();
        refuse(&mut answer, &why).unwrap();
        let mut d = Duplex(Vec::new(), std::io::Cursor::new(answer));
        let e = hello(&mut d, "precopy", guest_of(&rich_host()))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "destination refused: this host's CPU lacks features the guest uses: \
             CPUID 0x80000001 ECX bit 5 (LZCNT)"
        );
    }

    #[test]
    fn another_vendor_is_refused() {
        let mut amd = rich_host();
        amd[0] = entry(0, 0, [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65]);
        let why = cpu_incompatibility(&guest_of(&rich_host()), &amd).unwrap();
        assert_eq!(
            why,
            "CPU vendor GenuineIntel differs from this host's AuthenticAMD"
        );
    }
}
