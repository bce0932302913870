//! The shared platform devices, checked by CPU 0 once a second: the COM1
//! UART's scratch and line control registers, PIT channel 2's mode, count
//! and gate, and the two PICs' interrupt masks. A VMM that loses its serial
//! device's registers, the in-kernel PIT or the in-kernel irqchip across a
//! migration shows here. Everything is reached from ring 3 through the TSS's
//! I/O bitmap.

use crate::cpu::{inb, outb};

const UART_LCR: u16 = 0x3fb;
const UART_SCR: u16 = 0x3ff;
/// 8 data bits, even parity, 1 stop bit, DLAB clear (the VMM's console
/// ignores the line format; the default is 0).
const LCR: u8 = 0x1b;
const SCR: u8 = 0xa5;

const PIT_CH2: u16 = 0x42;
const PIT_CMD: u16 = 0x43;
const PORT_B: u16 = 0x61;
/// Channel 2, lobyte/hibyte, mode 2 (rate generator), binary.
const PIT_MODE: u8 = 0xb4;
/// Read-back: latch channel 2's status only.
const READ_STATUS: u8 = 0xe8;
/// Read-back: latch channel 2's count only.
const READ_COUNT: u8 = 0xd8;
/// The status of channel 2 as programmed, without the output and null-count
/// bits: lobyte/hibyte (0x30), mode 2 (0x04), binary.
const PIT_STATUS: u8 = 0x34;
const PIT_RELOAD: u16 = 0x1234;

const PIC1_IMR: u16 = 0x21;
const PIC2_IMR: u16 = 0xa1;
/// Every line masked but the master's cascade (IRQ 2) and the slave's IRQ 8;
/// the PICs' output (LAPIC LINT0) stays masked, so nothing is delivered.
const IMRS: [u8; 2] = [0xfb, 0xfe];

/// What the check found to hold at start.
pub struct Watch {
    uart: bool,
    pit: bool,
    pic: bool,
}

/// The PIT's channel 2: (status without the output and null-count bits,
/// count, gate).
fn pit() -> (u8, u16, bool) {
    outb(PIT_CMD, READ_STATUS);
    let status = inb(PIT_CH2) & 0x3f;
    outb(PIT_CMD, READ_COUNT);
    let lo = inb(PIT_CH2) as u16;
    let hi = inb(PIT_CH2) as u16;
    (status, hi << 8 | lo, inb(PORT_B) & 1 != 0)
}

/// A count channel 2 can hold: mode 2 counts from the reload value down to 1.
fn count_ok(count: u16) -> bool {
    (1..=PIT_RELOAD).contains(&count)
}

fn uart() -> (u8, u8) {
    (inb(UART_SCR), inb(UART_LCR))
}

fn pics() -> [u8; 2] {
    [inb(PIC1_IMR), inb(PIC2_IMR)]
}

impl Watch {
    /// Programs the devices (after the TSC calibration, which uses channel 2
    /// in mode 0) and keeps the checks of what reads back; `note` is told
    /// of each that does not.
    pub fn setup(note: impl Fn(core::fmt::Arguments)) -> Watch {
        outb(UART_SCR, SCR);
        outb(UART_LCR, LCR);
        let uart = uart() == (SCR, LCR);
        if !uart {
            note(format_args!(
                "uart scratch/lcr do not read back: not checked"
            ));
        }

        let gate = inb(PORT_B);
        outb(PORT_B, (gate & !0x02) | 0x01); // gate on, speaker off
        outb(PIT_CMD, PIT_MODE);
        outb(PIT_CH2, PIT_RELOAD as u8);
        outb(PIT_CH2, (PIT_RELOAD >> 8) as u8);
        let (status, count, gate_on) = pit();
        let pit = status == PIT_STATUS && count_ok(count) && gate_on;
        if !pit {
            note(format_args!(
                "pit channel 2 reads status={status:#x} count={count:#x} gate={gate_on}: not checked"
            ));
        }

        outb(PIC1_IMR, IMRS[0]);
        outb(PIC2_IMR, IMRS[1]);
        let pic = pics() == IMRS;
        if !pic {
            note(format_args!("pic masks do not read back: not checked"));
        }
        Watch { uart, pit, pic }
    }

    /// Reads each device once; a difference is reported and set right again.
    pub fn check(&self) {
        if self.uart {
            let (scr, lcr) = uart();
            if (scr, lcr) != (SCR, LCR) {
                crate::corrupt!(
                    "uart scr={scr:#x} lcr={lcr:#x} want_scr={SCR:#x} want_lcr={LCR:#x}"
                );
                outb(UART_SCR, SCR);
                outb(UART_LCR, LCR);
            }
        }
        if self.pit {
            let (status, count, gate) = pit();
            if status != PIT_STATUS || !count_ok(count) || !gate {
                crate::corrupt!(
                    "pit channel=2 status={status:#x} count={count:#x} gate={gate} want_status={PIT_STATUS:#x} want_count=1..={PIT_RELOAD:#x}"
                );
                outb(PORT_B, (inb(PORT_B) & !0x02) | 0x01);
                outb(PIT_CMD, PIT_MODE);
                outb(PIT_CH2, PIT_RELOAD as u8);
                outb(PIT_CH2, (PIT_RELOAD >> 8) as u8);
            }
        }
        if self.pic {
            let imr = pics();
            if imr != IMRS {
                crate::corrupt!(
                    "pic imr={:#x},{:#x} want={:#x},{:#x}",
                    imr[0],
                    imr[1],
                    IMRS[0],
                    IMRS[1]
                );
                outb(PIC1_IMR, IMRS[0]);
                outb(PIC2_IMR, IMRS[1]);
            }
        }
    }
}

/// `selftest=platform`: breaks each device's state on purpose (PIT channel
/// 2 back to mode 0, the calibration's; the UART's scratch register and the
/// master PIC's mask cleared).
pub fn sabotage() {
    outb(PIT_CMD, 0xb0);
    outb(PIT_CH2, PIT_RELOAD as u8);
    outb(PIT_CH2, (PIT_RELOAD >> 8) as u8);
    outb(UART_SCR, 0);
    outb(PIC1_IMR, 0);
}
