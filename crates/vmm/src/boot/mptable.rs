//! Intel MP table (MP spec 1.4): tells the guest how many vCPUs exist and where
//! the LAPIC and IOAPIC are, so it can start the others with INIT-SIPI-SIPI.

use super::BIOS_AREA_START;
use crate::error::Result;
use crate::memory::GuestRam;

/// LAPIC MMIO base.
pub const APIC_BASE: u32 = 0xfee0_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_BASE: u32 = 0xfec0_0000;
const IRQS: u8 = 24;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// Builds the floating pointer and configuration table, to be placed at `base`.
pub fn build(vcpus: usize, base: u32) -> Vec<u8> {
    let mut entries = Vec::new();
    for id in 0..vcpus {
        entries.push(0u8); // processor
        entries.push(id as u8);
        entries.push(0x14); // LAPIC version
        entries.push(if id == 0 { 0x3 } else { 0x1 }); // enabled (| boot processor)
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    let ioapic_id = vcpus as u8;
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_BASE.to_le_bytes());
    for irq in 0..IRQS {
        // INT, conforming polarity/trigger, ISA bus, irq -> ioapic pin
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
    }
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]); // ExtINT -> LINT0
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]); // NMI -> LINT1
    let count = vcpus + 1 + 1 + IRQS as usize + 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"MIGD    ");
    table.extend_from_slice(b"MIGD-VM     ");
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&(count as u16).to_le_bytes());
    table.extend_from_slice(&APIC_BASE.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(base + 16).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

/// Writes the MP table into the BIOS area.
pub fn write(ram: &GuestRam, vcpus: usize) -> Result<()> {
    ram.write(BIOS_AREA_START, &build(vcpus, BIOS_AREA_START as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_processor_count() {
        let t = build(4, 0xf0000);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        let cfg = &t[16..];
        assert_eq!(&cfg[0..4], b"PCMP");
        let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(cfg.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        let procs = cfg[44..].chunks(20).take_while(|e| e[0] == 0).count();
        assert_eq!(procs, 4);
        assert_eq!(cfg[44 + 3], 3, "vCPU 0 is the boot processor");
    }
}
