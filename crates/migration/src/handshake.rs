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
/// (a snapshot): the CPUID its vCPUs were captured with decides.
pub fn check_runs_here(state: &vmm::VmState) -> Result<()> {
    let why = state
        .vcpus
        .first()
        .and_then(|v| host_cannot_run(&describe("", &v.cpuid, 0, 0)));
    match why {
        Some(why) => Err(Error::Invalid(format!(
            "this host cannot run the VM: {why}"
        ))),
        None => Ok(()),
    }
}

/// The descriptor of a VM: name, size, vCPUs and the CPU features it was given.
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
    let mut features = Vec::new();
    if let Some(e) = leaf(1, 0) {
        features.extend([e.ecx, e.edx]);
    }
    if let Some(e) = leaf(7, 0) {
        features.extend([e.ebx, e.ecx, e.edx]);
    }
    VmDescriptor {
        name: name.to_string(),
        memory,
        vcpus: vcpus as u32,
        cpu_vendor: vendor,
        cpu_features: features,
    }
}

/// Destination check: can this host's CPU run a guest that was given `vm`'s features?
/// Returns the reason if not.
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
    // Leaf 1 ECX bit 31 (hypervisor) and the APIC-ID/OSXSAVE-style dynamic bits are not capabilities.
    let dynamic = [(0usize, (1u32 << 31) | (1 << 27)), (1, 1 << 9)];
    for (i, (&want, &have)) in vm.cpu_features.iter().zip(&host.cpu_features).enumerate() {
        let mask = dynamic
            .iter()
            .find(|(j, _)| *j == i)
            .map(|(_, m)| *m)
            .unwrap_or(0);
        let missing = want & !have & !mask;
        if missing != 0 {
            return Some(format!(
                "this host's CPU lacks features the guest uses (word {i}, bits {missing:#x})"
            ));
        }
    }
    None
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

    #[test]
    fn cpu_features_are_compared() {
        let mut host = vec![kvm_bindings::kvm_cpuid_entry2 {
            function: 1,
            ecx: 0b1010,
            edx: 0b1,
            ..Default::default()
        }];
        let vm = VmDescriptor {
            cpu_features: vec![0b1010, 0b1],
            cpu_vendor: String::new(),
            ..desc()
        };
        assert_eq!(cpu_incompatibility(&vm, &host), None);
        host[0].ecx = 0b0010;
        let why = cpu_incompatibility(&vm, &host).unwrap();
        assert!(why.contains("lacks features"), "{why}");
    }
}
