//! Linux bzImage boot (64-bit boot protocol) for hardware-KVM hosts.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::{
    low_ram_end, memory_map, path_string, BootEntry, BootSpec, CMDLINE_START, HIMEM_START,
    ZERO_PAGE_START,
};
use crate::error::{Error, Result};
use crate::memory::{GuestRam, PAGE_SIZE};

/// Boot GDT for the 64-bit entry (Linux's __BOOT_CS = 0x10, __BOOT_DS = 0x18).
pub const BOOT_GDT_START: u64 = 0x500;
/// Identity page tables for the 64-bit entry: PML4, PDPT, PD (first 1 GiB).
pub const BOOT_PML4_START: u64 = 0x9000;
const BOOT_PDPT_START: u64 = 0xa000;
const BOOT_PD_START: u64 = 0xb000;

/// The boot GDT entries: null, null, 64-bit code, data.
pub const BOOT_GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

pub(super) fn load_bzimage(
    ram: &GuestRam,
    spec: &BootSpec,
    file: &mut File,
    cmdline_len: usize,
) -> Result<BootEntry> {
    let loaded = BzImage::load(
        ram.guest_memory(),
        None,
        file,
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| Error::KernelFormat {
        path: spec.kernel.clone(),
        reason: format!("bzImage load failed: {e}"),
    })?;
    let mut header = loaded.setup_header.ok_or_else(|| Error::KernelFormat {
        path: spec.kernel.clone(),
        reason: "bzImage without a setup header".into(),
    })?;
    if { header.version } < 0x0206 {
        return Err(Error::KernelFormat {
            path: spec.kernel.clone(),
            reason: format!(
                "boot protocol {:#x} is older than 2.06 (64-bit entry needs it)",
                { header.version }
            ),
        });
    }
    header.type_of_loader = 0xff;
    header.boot_flag = 0xaa55;
    header.header = 0x5372_6448;
    header.cmd_line_ptr = CMDLINE_START as u32;
    header.cmdline_size = cmdline_len as u32;
    header.loadflags |= 0x80; // CAN_USE_HEAP
    header.heap_end_ptr = 0xfe00;
    // The kernel decompresses itself above where it was loaded: nothing of
    // ours may lie there, and the room must be in RAM.
    let runtime_end = decompression_end(&header, loaded.kernel_load.0)
        .filter(|&end| end <= low_ram_end(ram))
        .ok_or_else(|| Error::KernelFormat {
            path: spec.kernel.clone(),
            reason: format!(
                "it decompresses itself into {} bytes (init_size) from {:#x} (pref_address), \
                 past the guest's low RAM, which ends at {:#x}",
                { header.init_size },
                { header.pref_address },
                low_ram_end(ram)
            ),
        })?;
    if let Some(initrd) = &spec.initramfs {
        let above = loaded.kernel_end.max(runtime_end);
        let (addr, size) = load_initramfs(ram, initrd, above)?;
        header.ramdisk_image = addr as u32;
        header.ramdisk_size = size as u32;
    }
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    let map = memory_map(ram);
    if map.len() > params.e820_table.len() {
        return Err(Error::State("too many e820 entries".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    ram.guest_memory()
        .write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|e| Error::GuestMemory(format!("writing boot params: {e}")))?;
    write_long_mode_tables(ram)?;
    Ok(BootEntry::Linux64 {
        entry: loaded.kernel_load.0 + 0x200,
        boot_params: ZERO_PAGE_START,
    })
}

/// Where the kernel loaded at `load` may write up to as it decompresses
/// itself (boot protocol 2.10 on; before it, `load`: nothing more is known):
/// it uses `[start, start + init_size)`, `start` being `load` aligned up to
/// `kernel_alignment` but no lower than `pref_address` for a relocatable
/// kernel, `pref_address` for another. None if that overflows.
fn decompression_end(h: &setup_header, load: u64) -> Option<u64> {
    if { h.version } < 0x020a {
        return Some(load);
    }
    let pref = { h.pref_address };
    let start = if h.relocatable_kernel != 0 {
        let align = u64::from(h.kernel_alignment).max(1);
        load.checked_next_multiple_of(align)?.max(pref)
    } else {
        pref
    };
    start.checked_add(u64::from(h.init_size))
}

/// Writes the boot GDT and identity page tables for the first GiB.
fn write_long_mode_tables(ram: &GuestRam) -> Result<()> {
    let gdt: Vec<u8> = BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(BOOT_GDT_START, &gdt)?;
    ram.write(BOOT_PML4_START, &(BOOT_PDPT_START | 0x3).to_le_bytes())?;
    ram.write(BOOT_PDPT_START, &(BOOT_PD_START | 0x3).to_le_bytes())?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    ram.write(BOOT_PD_START, &pd)
}

/// Loads an initramfs page-aligned at the top of low RAM, above the kernel.
pub(super) fn load_initramfs(ram: &GuestRam, path: &Path, kernel_end: u64) -> Result<(u64, u64)> {
    let err = |reason: String| Error::Initramfs {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| err(format!("cannot stat: {e}")))?;
    // Its size is checked against the room before anything is read: a huge
    // file (a disk image, named by a migration peer's boot spec too) must be
    // refused, not read whole into the heap. A device or pipe has no size to
    // check, so only regular files are taken.
    if !meta.is_file() {
        return Err(err(format!("not a regular file ({})", path_string(path))));
    }
    let size = meta.len();
    // Stay below 2 GiB: the 32-bit ramdisk_image field and initrd_addr_max.
    let top = low_ram_end(ram).min(0x8000_0000);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel_end)
        .ok_or_else(|| {
            err(format!(
                "{} bytes do not fit in guest RAM above the kernel ({})",
                size,
                path_string(path)
            ))
        })?;
    // Exactly `size` bytes, straight into guest RAM (they fit: checked above);
    // a file that shrank since its stat fails here rather than loading short.
    ram.guest_memory()
        .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| err(format!("cannot read {size} bytes: {e}")))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal bzImage: a setup header with the HdrS magic and a tiny payload.
    fn fake_bzimage(version: u16) -> Vec<u8> {
        let mut img = vec![0u8; 0x1000 + 0x200];
        img[0x1f1] = 1; // setup_sects: setup is 2 sectors (boot sector + 1)
        img[0x1fe] = 0x55;
        img[0x1ff] = 0xaa;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x234] = 1; // relocatable
        img
    }

    #[test]
    fn bzimage_boot_params_and_entry() {
        let dir = std::env::temp_dir().join(format!("vmm-bz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("bzImage");
        std::fs::write(&k, fake_bzimage(0x020f)).unwrap();
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, vec![7u8; 10000]).unwrap();
        let ram = GuestRam::new(128 << 20).unwrap();
        let spec = BootSpec {
            kernel: k,
            initramfs: Some(initrd),
            cmdline: "console=ttyS0 panic=1".into(),
        };
        let entry = super::super::load(&ram, &spec, 2).unwrap();
        assert_eq!(
            entry,
            BootEntry::Linux64 {
                entry: HIMEM_START + 0x200,
                boot_params: ZERO_PAGE_START
            }
        );
        let p: boot_params = ram
            .guest_memory()
            .read_obj(GuestAddress(ZERO_PAGE_START))
            .unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 22);
        assert_eq!({ hdr.ramdisk_size }, 10000);
        let rd = { hdr.ramdisk_image } as u64;
        assert_eq!(rd % PAGE_SIZE, 0);
        assert!(rd + 10000 <= 128 << 20);
        let mut b = [0u8; 4];
        ram.read(rd, &mut b).unwrap();
        assert_eq!(b, [7; 4]);
        assert_eq!(p.e820_entries, 3);
        let e2 = p.e820_table[2];
        assert_eq!({ e2.addr }, HIMEM_START);
        let mut cl = [0u8; 22];
        ram.read(CMDLINE_START, &mut cl).unwrap();
        assert_eq!(&cl[..21], b"console=ttyS0 panic=1");
        assert_eq!(cl[21], 0);
        let mut pd0 = [0u8; 8];
        ram.read(BOOT_PD_START, &mut pd0).unwrap();
        assert_eq!(u64::from_le_bytes(pd0), 0x83);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An initramfs far larger than the guest (a 64 GiB sparse file: no disk
    /// used) is refused by its size before any of it is read; reading it
    /// first would allocate its whole size in the VM process.
    #[test]
    fn huge_initramfs_refused_before_reading() {
        let dir = std::env::temp_dir().join(format!("vmm-bz-huge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("bzImage");
        std::fs::write(&k, fake_bzimage(0x020f)).unwrap();
        let initrd = dir.join("disk.img");
        File::create(&initrd).unwrap().set_len(64 << 30).unwrap();
        let ram = GuestRam::new(64 << 20).unwrap();
        let spec = BootSpec {
            kernel: k,
            initramfs: Some(initrd.clone()),
            cmdline: String::new(),
        };
        let started = std::time::Instant::now();
        match super::super::load(&ram, &spec, 1) {
            Err(Error::Initramfs { path, reason }) => {
                assert_eq!(path, initrd);
                assert!(
                    reason.contains(&format!("{} bytes do not fit", 64u64 << 30)),
                    "{reason}"
                );
            }
            other => panic!("expected the initramfs size error, got {other:?}"),
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Neither is anything without a size taken (a device reads forever).
        match load_initramfs(&ram, Path::new("/dev/zero"), HIMEM_START) {
            Err(Error::Initramfs { reason, .. }) => {
                assert!(reason.contains("not a regular file"), "{reason}")
            }
            other => panic!("expected /dev/zero refused, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A distribution kernel decompresses itself at 16 MiB (`pref_address`)
    /// into `init_size` bytes: an initramfs is placed above that, not just
    /// above the compressed image it would overwrite, and a guest whose RAM
    /// ends before it is refused naming why.
    #[test]
    fn the_initramfs_goes_above_where_the_kernel_decompresses_itself() {
        let dir = std::env::temp_dir().join(format!("vmm-bz-init-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut img = fake_bzimage(0x020f);
        img[0x230..0x234].copy_from_slice(&(2u32 << 20).to_le_bytes()); // kernel_alignment
        img[0x258..0x260].copy_from_slice(&(16u64 << 20).to_le_bytes()); // pref_address
        img[0x260..0x264].copy_from_slice(&(40u32 << 20).to_le_bytes()); // init_size
        let k = dir.join("bzImage");
        std::fs::write(&k, img).unwrap();
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, vec![7u8; 10 << 20]).unwrap();
        let spec = BootSpec {
            kernel: k,
            initramfs: Some(initrd),
            cmdline: String::new(),
        };
        let ramdisk = |memory: u64| {
            let ram = GuestRam::new(memory).unwrap();
            super::super::load(&ram, &spec, 1).map(|_| {
                let p: boot_params = ram
                    .guest_memory()
                    .read_obj(GuestAddress(ZERO_PAGE_START))
                    .unwrap();
                u64::from(p.hdr.ramdisk_image)
            })
        };
        // 128 MiB: at the top, above 16 + 40 MiB.
        assert_eq!(ramdisk(128 << 20).unwrap(), 118 << 20);
        // 64 MiB: the top 10 MiB would begin at 54 MiB, inside it.
        match ramdisk(64 << 20) {
            Err(Error::Initramfs { reason, .. }) => {
                assert!(reason.contains("do not fit"), "{reason}")
            }
            other => panic!("expected the initramfs refused, got {other:?}"),
        }
        // 48 MiB: the kernel itself has no room.
        match ramdisk(48 << 20) {
            Err(Error::KernelFormat { reason, .. }) => {
                assert!(reason.contains("init_size"), "{reason}")
            }
            other => panic!("expected the kernel refused, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn old_boot_protocol_refused() {
        let dir = std::env::temp_dir().join(format!("vmm-bz-old-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("bzImage");
        std::fs::write(&k, fake_bzimage(0x0202)).unwrap();
        let ram = GuestRam::new(64 << 20).unwrap();
        let spec = BootSpec {
            kernel: k,
            initramfs: None,
            cmdline: String::new(),
        };
        let e = super::super::load(&ram, &spec, 1).unwrap_err();
        assert!(e.to_string().contains("older than 2.06"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
