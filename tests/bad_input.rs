//! Bad input to `migd run`: each case gets a one-line error naming the cause,
//! a non-zero exit, no panic and no files left behind.

mod common;

use common::*;

fn refused(args: &[&str], needle: &str) {
    let (code, stderr) = migd_output(args);
    assert_ne!(code, 0, "{args:?} was accepted");
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(
        error_lines.len(),
        1,
        "{args:?}: expected one error line:\n{stderr}"
    );
    assert!(
        error_lines[0].contains(needle),
        "{args:?}: error '{}' does not name '{needle}'",
        error_lines[0]
    );
}

#[test]
fn bad_kernels_memory_and_vcpus_are_refused() {
    let dir = scratch("badinput");
    let garbage = dir.join("garbage.bin");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    let g = garbage.to_str().unwrap();
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(200, 0);
    let bad_elf = dir.join("bad.elf");
    std::fs::write(&bad_elf, &elf).unwrap();
    let missing = dir.join("missing");
    let m = missing.to_str().unwrap();
    refused(&["run", "--kernel", m], "cannot read kernel");
    refused(&["run", "--kernel", g], "neither an ELF");
    refused(
        &["run", "--kernel", bad_elf.to_str().unwrap()],
        "not bootable",
    );
    refused(&["run", "--kernel", g, "--cpus", "0"], "vCPU count 0");
    refused(&["run", "--kernel", g, "--cpus", "9"], "vCPU count 9");
    refused(
        &["run", "--kernel", g, "--memory", "512G"],
        "exceeds what this host can give",
    );
    refused(&["run", "--kernel", g, "--memory", "1M"], "at least 16 MiB");
    refused(&["run", "--kernel", g, "--memory", "lots"], "not a size");
    // Lazy restore fills absent pages: memory allocated up front has none.
    refused(
        &["run", "--restore", g, "--lazy", "--prefault"],
        "'--lazy' cannot be used with '--prefault'",
    );
    let (code, stderr) = migd_output(&["run"]);
    assert_eq!(code, 2, "clap usage error");
    assert!(stderr.contains("--kernel"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        2,
        "nothing written"
    );
}

#[test]
fn bad_snapshots_are_refused() {
    if !kvm_or_skip("bad_snapshots_are_refused") {
        return;
    }
    let dir = scratch("badsnap");
    let snap = dir.join("good.snap");
    // A real snapshot to damage: boot the guest briefly and save it.
    let snap_arg = snap.to_str().unwrap();
    let mut vm = VmProcess::boot_with(
        &dir,
        "a",
        "workload=idle",
        "64M",
        1,
        &["--snapshot-on-signal", snap_arg],
    );
    vm.console
        .wait_for("WORKLOAD READY", std::time::Duration::from_secs(60));
    vm.signal(nix::sys::signal::Signal::SIGUSR2);
    assert_eq!(vm.wait(std::time::Duration::from_secs(60)), 0);
    let good = std::fs::read(&snap).unwrap();
    let case = |name: &str, bytes: &[u8], needle: &str| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        refused(&["run", "--restore", p.to_str().unwrap()], needle);
    };
    case("truncated.snap", &good[..good.len() / 2], "truncated");
    case("header-only.snap", &good[..64], "truncated");
    let mut corrupt = good.clone();
    let n = corrupt.len();
    corrupt[n - 100] ^= 0xff;
    case("corrupt.snap", &corrupt, "checksum mismatch");
    case("foreign.snap", &vec![0x42; 4096], "not a migd snapshot");
    let mut v9 = good.clone();
    v9[8] = 9;
    case("v9.snap", &v9, "format version 9 is not supported");
    refused(
        &["run", "--restore", dir.join("none.snap").to_str().unwrap()],
        "cannot open",
    );
    // A FIFO (opening it would block until a writer came) and a directory.
    let fifo = dir.join("fifo.snap");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    for lazy in [false, true] {
        for path in [&fifo, &dir] {
            let mut args = vec!["run", "--restore", path.to_str().unwrap()];
            if lazy {
                args.push("--lazy");
            }
            refused(&args, "not a regular file");
        }
    }
    // A snapshot of a VM whose CPU this host lacks (every feature bit of
    // CPUID leaf 7 set): refused, eagerly and lazily, naming why.
    let (mut state, ram, _) = vmm::snapshot::read(&snap).unwrap();
    for v in &mut state.vcpus {
        for e in v
            .cpuid
            .iter_mut()
            .filter(|e| e.function == 7 && e.index == 0)
        {
            e.ebx = u32::MAX;
        }
    }
    let alien = dir.join("alien.snap");
    vmm::snapshot::write(&alien, &state, &ram).unwrap();
    let alien = alien.to_str().unwrap();
    refused(
        &["run", "--restore", alien],
        "lacks features the guest uses",
    );
    refused(
        &["run", "--restore", alien, "--lazy"],
        "lacks features the guest uses",
    );
    // The daemon refuses it from the file's front, before a VM process
    // would read all of its memory, and lists nothing.
    let d = common::daemon::Daemon::start(&dir, "d");
    for lazy in [false, true] {
        let mut args = vec!["restore", "web9", alien];
        if lazy {
            args.push("--lazy");
        }
        let e = d.fails(&args);
        assert!(e.contains("lacks features the guest uses"), "{e}");
        assert!(!e.contains("VM process"), "refused by a VM process: {e}");
        assert_ne!(d.migctl(&["info", "web9"]).0, 0, "web9 listed");
    }
    // A boot section that a migration's Boot message could not carry (a NUL
    // in its command line, no kernel path) is refused with the file, before
    // the VM exists; before, the VM was restored with it, to fail at `start`.
    let _reaper = common::daemon::Reaper(d.state.clone());
    let (state, ram, _) = vmm::snapshot::read(&snap).unwrap();
    let elf = guest_elf().canonicalize().unwrap();
    for (name, boot, why) in [
        (
            "nul.snap",
            vmm::BootSpec {
                kernel: elf.clone(),
                initramfs: None,
                cmdline: "console=ttyS0\0init=/evil".into(),
            },
            "boot spec command line holds a NUL byte",
        ),
        (
            "no-kernel.snap",
            vmm::BootSpec {
                kernel: std::path::PathBuf::new(),
                initramfs: None,
                cmdline: "console=ttyS0".into(),
            },
            "boot spec without a kernel path",
        ),
    ] {
        let p = dir.join(name);
        let progress = Default::default();
        vmm::snapshot::write_with_working_set(&p, &state, &ram, None, Some(&boot), &progress)
            .unwrap();
        let p = p.to_str().unwrap();
        let e = d.fails(&["restore", "web8", p]);
        assert!(
            e.contains(&format!(
                "restoring {p}: its boot section is refused: {why}"
            )),
            "{e}"
        );
        assert_ne!(d.migctl(&["info", "web8"]).0, 0, "web8 listed");
        assert!(!d.vm_dir("web8").exists(), "{name} left a VM directory");
    }
}
