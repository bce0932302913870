//! Loading a guest: PVH ELF (our test guest, Linux vmlinux) or Linux bzImage,
//! the memory map handed to it, the MP table, and the boot vCPU's entry state.

mod linux;
pub mod mptable;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::loader::{elf::Elf, elf::PvhBootCapability, KernelLoader};
use vm_memory::GuestAddress;

use crate::error::{Error, Result};
use crate::memory::{GuestRam, MMIO_HOLE_END};

pub use linux::{BOOT_GDT_START, BOOT_PML4_START};

/// Where the PVH `hvm_start_info` goes.
pub const PVH_INFO_START: u64 = 0x6000;
/// Where the PVH memory map goes (right after the start info).
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Where Linux's boot parameters (the "zero page") go.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Where the kernel command line goes.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we accept, with its terminating NUL.
pub const CMDLINE_MAX: usize = 4096;
/// Start of the BIOS area holding the MP table.
pub const BIOS_AREA_START: u64 = 0xf0000;
/// End of usable conventional memory (start of the EBDA).
pub const EBDA_START: u64 = 0x9fc00;
/// Where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;

const PVH_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// How the boot vCPU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `rbx` = start info.
    Pvh {
        /// 32-bit entry point from the ELF note.
        entry: u64,
        /// Guest address of `hvm_start_info`.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: long mode, identity paging, `rsi` = boot params.
    Linux64 {
        /// 64-bit entry (load address + 0x200).
        entry: u64,
        /// Guest address of the zero page.
        boot_params: u64,
    },
}

/// What to boot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootSpec {
    /// Kernel image: ELF with a PVH note, or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs (bzImage and PVH).
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// One entry of the guest's physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemMapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type: 1 RAM, 2 reserved.
    pub kind: u32,
}

/// The guest memory map: RAM, minus the EBDA and BIOS area, around the MMIO hole.
pub fn memory_map(ram: &GuestRam) -> Vec<MemMapEntry> {
    let mut map = vec![
        MemMapEntry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        MemMapEntry {
            addr: BIOS_AREA_START,
            size: HIMEM_START - BIOS_AREA_START,
            kind: E820_RESERVED,
        },
    ];
    for r in ram.ranges() {
        let start = r.guest_addr.max(HIMEM_START);
        let end = r.guest_addr + r.len;
        if end > start {
            map.push(MemMapEntry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// Loads the kernel (and initramfs) described by `spec` into RAM, writes the
/// command line, memory map and MP table, and returns how vCPU 0 enters.
pub fn load(ram: &GuestRam, spec: &BootSpec, vcpus: usize) -> Result<BootEntry> {
    if spec.cmdline.len() + 1 > CMDLINE_MAX {
        return Err(Error::Cmdline(format!(
            "{} bytes is longer than the {} allowed",
            spec.cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    if spec.cmdline.as_bytes().contains(&0) {
        return Err(Error::Cmdline("contains a NUL byte".into()));
    }
    let mut file = File::open(&spec.kernel).map_err(|cause| Error::KernelRead {
        path: spec.kernel.clone(),
        cause,
    })?;
    let mut magic = [0u8; 0x206];
    let n = read_up_to(&mut file, &mut magic).map_err(|cause| Error::KernelRead {
        path: spec.kernel.clone(),
        cause,
    })?;
    let mut cmdline = spec.cmdline.clone().into_bytes();
    cmdline.push(0);
    ram.write(CMDLINE_START, &cmdline)?;
    mptable::write(ram, vcpus)?;
    if n >= 4 && magic[..4] == *b"\x7fELF" {
        load_pvh(ram, spec, &mut file)
    } else if n >= 0x206 && magic[0x202..0x206] == *b"HdrS" {
        linux::load_bzimage(ram, spec, &mut file, cmdline.len())
    } else {
        Err(Error::KernelFormat {
            path: spec.kernel.clone(),
            reason: "neither an ELF (PVH) nor a Linux bzImage".into(),
        })
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn load_pvh(ram: &GuestRam, spec: &BootSpec, file: &mut File) -> Result<BootEntry> {
    let bad = |reason: String| Error::KernelFormat {
        path: spec.kernel.clone(),
        reason,
    };
    check_elf_segments(file, &spec.kernel, low_ram_end(ram))?;
    let loaded = Elf::load(
        ram.guest_memory(),
        None,
        file,
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| bad(format!("ELF load failed: {e}")))?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => a.0,
        _ => {
            return Err(bad(
                "ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)".into()
            ))
        }
    };
    let mut modules = Vec::new();
    if let Some(initrd) = &spec.initramfs {
        let (addr, size) = linux::load_initramfs(ram, initrd, loaded.kernel_end)?;
        modules.push((addr, size));
    }
    write_pvh_start_info(ram, &modules)?;
    Ok(BootEntry::Pvh {
        entry,
        start_info: PVH_INFO_START,
    })
}

/// Size of an ELF64 file header.
const ELF64_EHDR_SIZE: usize = 64;
/// Size of an ELF64 program header, the only size linux-loader reads.
const ELF64_PHDR_SIZE: usize = 56;
/// Program header type of a loadable segment.
const PT_LOAD: u32 = 1;

/// Refuses an ELF kernel whose loadable segments would not land in guest RAM
/// at or above 1 MiB. linux-loader checks only the entry point against that
/// floor and writes each `PT_LOAD` at its `p_paddr` as it stands, so a segment
/// below 1 MiB would overwrite the command line (0x20000) and the MP table
/// (0xf0000), written before it, or be overwritten by the PVH start info
/// (0x6000), written after. Reads only the file and program headers.
fn check_elf_segments(file: &File, path: &Path, low_end: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let bad = |reason: String| Error::KernelFormat {
        path: path.to_path_buf(),
        reason,
    };
    let read_err = |cause: std::io::Error| Error::KernelRead {
        path: path.to_path_buf(),
        cause,
    };
    let file_len = file.metadata().map_err(read_err)?.len();
    if file_len < ELF64_EHDR_SIZE as u64 {
        return Err(bad(format!(
            "ELF of {file_len} bytes is shorter than its {ELF64_EHDR_SIZE}-byte header"
        )));
    }
    let mut ehdr = [0u8; ELF64_EHDR_SIZE];
    file.read_exact_at(&mut ehdr, 0).map_err(read_err)?;
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(bad(format!(
            "not a little-endian ELF64 (class {}, data {})",
            ehdr[4], ehdr[5]
        )));
    }
    let phoff = u64::from_le_bytes(field(&ehdr, 0x20));
    let phentsize = u16::from_le_bytes(field(&ehdr, 0x36));
    let phnum = u16::from_le_bytes(field(&ehdr, 0x38));
    if usize::from(phentsize) != ELF64_PHDR_SIZE {
        return Err(bad(format!(
            "program header size {phentsize}, not {ELF64_PHDR_SIZE}"
        )));
    }
    let table_len = usize::from(phnum) * ELF64_PHDR_SIZE;
    if phoff
        .checked_add(table_len as u64)
        .is_none_or(|end| end > file_len)
    {
        return Err(bad(format!(
            "{phnum} program headers at offset {phoff:#x} run past the end of the \
             {file_len}-byte file"
        )));
    }
    let mut table = vec![0u8; table_len];
    file.read_exact_at(&mut table, phoff).map_err(read_err)?;
    for (index, ph) in table.chunks_exact(ELF64_PHDR_SIZE).enumerate() {
        if u32::from_le_bytes(field(ph, 0)) != PT_LOAD {
            continue;
        }
        let paddr = u64::from_le_bytes(field(ph, 0x18));
        let filesz = u64::from_le_bytes(field(ph, 0x20));
        let memsz = u64::from_le_bytes(field(ph, 0x28));
        if filesz == 0 && memsz == 0 {
            continue; // takes no memory
        }
        // linux-loader writes `p_filesz` bytes: the range checked must hold them.
        if filesz > memsz {
            return Err(bad(format!(
                "PT_LOAD segment {index} at {paddr:#x}: file size {filesz:#x} is larger \
                 than its memory size {memsz:#x}"
            )));
        }
        let end = paddr.checked_add(memsz).ok_or_else(|| {
            bad(format!(
                "PT_LOAD segment {index}: address {paddr:#x} + size {memsz:#x} overflows"
            ))
        })?;
        if paddr < HIMEM_START {
            return Err(bad(format!(
                "PT_LOAD segment {index} at [{paddr:#x}, {end:#x}) starts below \
                 {HIMEM_START:#x} (1 MiB), where the boot tables, command line and MP \
                 table go"
            )));
        }
        if end > low_end {
            return Err(bad(format!(
                "PT_LOAD segment {index} at [{paddr:#x}, {end:#x}) reaches past the end \
                 of the guest's low RAM ({low_end:#x})"
            )));
        }
    }
    Ok(())
}

/// The `N` bytes at `at` of a header whose length was checked.
fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

/// Writes `hvm_start_info` (version 1, with memory map) and the module list.
fn write_pvh_start_info(ram: &GuestRam, modules: &[(u64, u64)]) -> Result<()> {
    let map = memory_map(ram);
    let mut memmap = Vec::with_capacity(map.len() * 24);
    for e in &map {
        memmap.extend_from_slice(&e.addr.to_le_bytes());
        memmap.extend_from_slice(&e.size.to_le_bytes());
        memmap.extend_from_slice(&e.kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    let modlist_addr = PVH_MEMMAP_START + memmap.len() as u64;
    let mut modlist = Vec::new();
    for (addr, size) in modules {
        modlist.extend_from_slice(&addr.to_le_bytes());
        modlist.extend_from_slice(&size.to_le_bytes());
        modlist.extend_from_slice(&0u64.to_le_bytes());
        modlist.extend_from_slice(&0u64.to_le_bytes());
    }
    if modlist_addr + modlist.len() as u64 > ZERO_PAGE_START + 0x1000 {
        return Err(Error::State(
            "PVH boot tables do not fit below 0x8000".into(),
        ));
    }
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&PVH_START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&(modules.len() as u32).to_le_bytes());
    info.extend_from_slice(&(if modules.is_empty() { 0 } else { modlist_addr }).to_le_bytes());
    info.extend_from_slice(&CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes()); // rsdp
    info.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    ram.write(PVH_INFO_START, &info)?;
    ram.write(PVH_MEMMAP_START, &memmap)?;
    ram.write(modlist_addr, &modlist)?;
    Ok(())
}

/// Highest guest address + 1 of low RAM (below the MMIO hole).
pub(crate) fn low_ram_end(ram: &GuestRam) -> u64 {
    ram.ranges()
        .iter()
        .filter(|r| r.guest_addr < MMIO_HOLE_END)
        .map(|r| r.guest_addr + r.len)
        .max()
        .unwrap_or(0)
}

/// Path helper for error messages.
pub(crate) fn path_string(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_of_big_guest() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let m = memory_map(&ram);
        assert_eq!(
            m[0],
            MemMapEntry {
                addr: 0,
                size: EBDA_START,
                kind: 1
            }
        );
        assert_eq!(m[2].addr, HIMEM_START);
        assert_eq!(m[2].size, (64 << 20) - HIMEM_START);
    }

    #[test]
    fn pvh_start_info_layout() {
        let ram = GuestRam::new(64 << 20).unwrap();
        write_pvh_start_info(&ram, &[]).unwrap();
        let mut b = [0u8; 56];
        ram.read(PVH_INFO_START, &mut b).unwrap();
        assert_eq!(
            u32::from_le_bytes(b[0..4].try_into().unwrap()),
            PVH_START_MAGIC
        );
        assert_eq!(
            u64::from_le_bytes(b[24..32].try_into().unwrap()),
            CMDLINE_START
        );
        assert_eq!(
            u64::from_le_bytes(b[40..48].try_into().unwrap()),
            PVH_MEMMAP_START
        );
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 3);
    }

    #[test]
    fn rejects_garbage_kernel() {
        let dir = std::env::temp_dir().join(format!("vmm-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("garbage");
        std::fs::write(&k, b"this is not a kernel").unwrap();
        let ram = GuestRam::new(64 << 20).unwrap();
        let spec = BootSpec {
            kernel: k,
            initramfs: None,
            cmdline: String::new(),
        };
        let e = load(&ram, &spec, 1).unwrap_err();
        assert!(e.to_string().contains("neither an ELF"), "{e}");
        let spec = BootSpec {
            kernel: dir.join("missing"),
            initramfs: None,
            cmdline: String::new(),
        };
        assert!(matches!(
            load(&ram, &spec, 1),
            Err(Error::KernelRead { .. })
        ));
        let mut elf = b"\x7fELF".to_vec();
        elf.resize(64, 0);
        std::fs::write(dir.join("bad.elf"), &elf).unwrap();
        let spec = BootSpec {
            kernel: dir.join("bad.elf"),
            initramfs: None,
            cmdline: String::new(),
        };
        assert!(matches!(
            load(&ram, &spec, 1),
            Err(Error::KernelFormat { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A minimal little-endian ELF64 executable: one `PT_LOAD` per `(paddr,
    /// filesz, memsz)` (its bytes 0x90), then a `PT_NOTE` with the PVH entry
    /// note pointing at 1 MiB + 0x20.
    fn synthetic_elf(loads: &[(u64, u64, u64)]) -> Vec<u8> {
        let phnum = loads.len() + 1;
        let mut elf = vec![0u8; 64 + 56 * phnum];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // ELFCLASS64
        elf[5] = 1; // little-endian
        elf[6] = 1; // EV_CURRENT
        elf[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        elf[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        elf[0x18..0x20].copy_from_slice(&(HIMEM_START + 0x20).to_le_bytes()); // e_entry
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[0x38..0x3a].copy_from_slice(&(phnum as u16).to_le_bytes());
        let mut phdr = |i: usize, p_type: u32, offset: u64, paddr: u64, filesz: u64, memsz: u64| {
            let h = &mut elf[64 + 56 * i..64 + 56 * (i + 1)];
            h[0..4].copy_from_slice(&p_type.to_le_bytes());
            h[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
            h[8..0x10].copy_from_slice(&offset.to_le_bytes());
            h[0x10..0x18].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
            h[0x18..0x20].copy_from_slice(&paddr.to_le_bytes());
            h[0x20..0x28].copy_from_slice(&filesz.to_le_bytes());
            h[0x28..0x30].copy_from_slice(&memsz.to_le_bytes());
            h[0x30..0x38].copy_from_slice(&4u64.to_le_bytes());
        };
        let mut offset = (64 + 56 * phnum) as u64;
        for (i, &(paddr, filesz, memsz)) in loads.iter().enumerate() {
            phdr(i, PT_LOAD, offset, paddr, filesz, memsz);
            offset += filesz;
        }
        phdr(loads.len(), 4, offset, HIMEM_START, 20, 20); // PT_NOTE
        for &(_, filesz, _) in loads {
            elf.resize(elf.len() + filesz as usize, 0x90);
        }
        for word in [4u32, 4, 18] {
            elf.extend_from_slice(&word.to_le_bytes()); // namesz, descsz, PHYS32_ENTRY
        }
        elf.extend_from_slice(b"Xen\0");
        elf.extend_from_slice(&((HIMEM_START + 0x20) as u32).to_le_bytes());
        elf
    }

    /// `load` of a synthetic ELF kernel with these segments, in a 64 MiB guest.
    fn load_synthetic(name: &str, loads: &[(u64, u64, u64)]) -> (GuestRam, Result<BootEntry>) {
        let dir = std::env::temp_dir().join(format!("vmm-elf-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("kernel.elf");
        std::fs::write(&k, synthetic_elf(loads)).unwrap();
        let ram = GuestRam::new(64 << 20).unwrap();
        let spec = BootSpec {
            kernel: k,
            initramfs: None,
            cmdline: "console=ttyS0".into(),
        };
        let result = load(&ram, &spec, 1);
        std::fs::remove_dir_all(&dir).unwrap();
        (ram, result)
    }

    fn format_reason(r: Result<BootEntry>) -> String {
        match r {
            Err(Error::KernelFormat { reason, .. }) => reason,
            other => panic!("expected a kernel format error, got {other:?}"),
        }
    }

    #[test]
    fn elf_segment_below_1mib_refused() {
        // Over the command line at 0x20000: refused, and the command line,
        // written before the kernel, is still there.
        let (ram, r) = load_synthetic(
            "low",
            &[(HIMEM_START, 0x100, 0x1000), (0x20000, 0x40, 0x1000)],
        );
        let reason = format_reason(r);
        assert!(
            reason.contains("PT_LOAD segment 1 at [0x20000, 0x21000) starts below 0x100000"),
            "{reason}"
        );
        let mut cl = [0u8; 14];
        ram.read(CMDLINE_START, &mut cl).unwrap();
        assert_eq!(&cl, b"console=ttyS0\0");
    }

    #[test]
    fn elf_segment_overflowing_or_past_ram_refused() {
        let (_, r) = load_synthetic("wrap", &[(0xffff_ffff_ffff_f000, 0x10, 0x2000)]);
        let reason = format_reason(r);
        assert!(
            reason
                .contains("PT_LOAD segment 0: address 0xfffffffffffff000 + size 0x2000 overflows"),
            "{reason}"
        );
        let (_, r) = load_synthetic("past", &[(HIMEM_START, 0x10, 64 << 20)]);
        let reason = format_reason(r);
        assert!(
            reason.contains("PT_LOAD segment 0 at [0x100000, 0x4100000) reaches past the end")
                && reason.contains("low RAM (0x4000000)"),
            "{reason}"
        );
        let (_, r) = load_synthetic("filesz", &[(HIMEM_START, 0x20, 0x10)]);
        let reason = format_reason(r);
        assert!(
            reason.contains("file size 0x20 is larger than its memory size 0x10"),
            "{reason}"
        );
    }

    #[test]
    fn elf_segment_at_1mib_loads() {
        // The test guest's layout: one segment at 1 MiB, bss beyond its file bytes.
        let (ram, r) = load_synthetic("ok", &[(HIMEM_START, 0x100, 0x10_8460)]);
        assert_eq!(
            r.unwrap(),
            BootEntry::Pvh {
                entry: HIMEM_START + 0x20,
                start_info: PVH_INFO_START
            }
        );
        let mut b = [0u8; 4];
        ram.read(HIMEM_START, &mut b).unwrap();
        assert_eq!(b, [0x90; 4]);
        // A segment ending exactly at the end of low RAM is in it.
        let (_, r) = load_synthetic("top", &[(HIMEM_START, 0x10, (64 << 20) - HIMEM_START)]);
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn rejects_long_cmdline() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let spec = BootSpec {
            kernel: "/nonexistent".into(),
            initramfs: None,
            cmdline: "x".repeat(5000),
        };
        assert!(matches!(load(&ram, &spec, 1), Err(Error::Cmdline(_))));
    }
}
