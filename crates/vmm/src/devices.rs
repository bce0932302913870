//! Devices emulated in user space: the 16550 serial console (vm-superio), the
//! power-off/exit port, and the i8042 reset line.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};

/// COM1 base port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1's IRQ line.
pub const SERIAL_IRQ: u32 = 4;
/// Exit port (as QEMU's isa-debug-exit at 0xf4): 0 = power off, else fatal code.
pub const EXIT_PORT: u16 = 0xf4;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Interrupt line of the serial port, an eventfd bound to a KVM irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What a port write asks of the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoAction {
    /// Nothing beyond the device's own effect.
    None,
    /// The guest powered off cleanly.
    PowerOff,
    /// The guest reported a fatal error with this code.
    GuestFatal(u32),
    /// The guest asked for a reset.
    Reset,
}

/// Serial state as it travels in a snapshot or migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, IER, IIR, LCR, LSR, MCR, MSR, scratch.
    pub registers: [u8; 9],
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialSnapshot {
    fn from(s: &SerialState) -> Self {
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        let r = s.registers;
        SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Most bytes a console file takes before it is rotated: renamed to
/// `FILE.1` (replacing the one before) and begun anew, as virtlogd does, so
/// that a guest that writes without end takes at most twice this much disk.
pub const CONSOLE_MAX_BYTES: u64 = 8 << 20;

/// Console output to its file: a line per write(2) where the writer leaves
/// it to this buffer; vm-superio's UART flushes after every byte, so the
/// console file grows a byte at a time and a reader may see half a line.
pub struct ConsoleWriter {
    file: File,
    line: Vec<u8>,
    /// The file's path where it is a regular file (None: never rotated).
    path: Option<PathBuf>,
    /// Bytes in the file.
    size: u64,
    /// Past this many bytes, the file is rotated.
    max: u64,
}

impl ConsoleWriter {
    /// Renames the file to `FILE.1` and begins a new one; on failure (said
    /// once) writes on where it was.
    fn rotate(&mut self) {
        let Some(path) = &self.path else { return };
        let mut old = path.clone().into_os_string();
        old.push(".1");
        let reopened = std::fs::rename(path, &old)
            .and_then(|()| OpenOptions::new().create(true).append(true).open(path));
        match reopened {
            Ok(f) => {
                self.file = f;
                self.size = 0;
            }
            Err(e) => {
                tracing::warn!(console = %path.display(), "rotating the console file: {e}");
                // Tried again once as much more is written.
                self.size = 0;
            }
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.line.len() >= 4096 {
            self.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.line.is_empty() {
            if self.size > 0 && self.size + self.line.len() as u64 > self.max {
                self.rotate();
            }
            let r = self.file.write_all(&self.line);
            self.size += self.line.len() as u64;
            self.line.clear();
            r?;
        }
        Ok(())
    }
}

/// Where the console goes: a file (appended to) or nowhere.
fn open_console(path: Option<&Path>) -> Result<ConsoleWriter> {
    open_console_up_to(path, CONSOLE_MAX_BYTES)
}

fn open_console_up_to(path: Option<&Path>, max: u64) -> Result<ConsoleWriter> {
    let file = match path {
        Some(p) => OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| Error::Device {
                device: "serial",
                reason: format!("cannot open console file {}: {e}", p.display()),
            })?,
        None => File::options()
            .write(true)
            .open("/dev/null")
            .map_err(|e| Error::Device {
                device: "serial",
                reason: format!("/dev/null: {e}"),
            })?,
    };
    let meta = file.metadata().ok();
    // Only a regular file is rotated: a device, a pipe or a terminal named
    // as the console is written to as it is.
    let regular = meta.as_ref().is_some_and(|m| m.is_file());
    Ok(ConsoleWriter {
        file,
        line: Vec::with_capacity(256),
        path: path.filter(|_| regular).map(Path::to_path_buf),
        size: meta.map_or(0, |m| m.len()),
        max,
    })
}

/// The port-I/O devices of one VM.
pub struct Devices {
    serial: Serial<IrqLine, NoEvents, ConsoleWriter>,
    console: Option<PathBuf>,
}

impl Devices {
    /// New devices; the serial port's output is appended to `console`.
    pub fn new(irq: EventFd, console: Option<&Path>) -> Result<Self> {
        Ok(Devices {
            serial: Serial::new(IrqLine(irq), open_console(console)?),
            console: console.map(Path::to_path_buf),
        })
    }

    /// Devices restored from a snapshot.
    pub fn restore(irq: EventFd, console: Option<&Path>, state: &SerialSnapshot) -> Result<Self> {
        let serial = Serial::from_state(
            &SerialState::from(state),
            IrqLine(irq),
            NoEvents,
            open_console(console)?,
        )
        .map_err(|e| Error::Device {
            device: "serial",
            reason: format!("restoring state: {e:?}"),
        })?;
        Ok(Devices {
            serial,
            console: console.map(Path::to_path_buf),
        })
    }

    /// The console file, if any.
    pub fn console(&self) -> Option<&Path> {
        self.console.as_deref()
    }

    /// The serial port's state.
    pub fn serial_state(&self) -> SerialSnapshot {
        SerialSnapshot::from(&self.serial.state())
    }

    /// A guest `out` to `port` as KVM hands it over: `data` holds
    /// `data.len() / size` elements of `size` bytes, more than one for a
    /// string `outs` (with or without `rep`). Each element is one access,
    /// in order; the first that asks more than `IoAction::None` of the VMM
    /// (power off, reset) ends the instruction there.
    pub fn pio_out(&mut self, port: u16, size: usize, data: &[u8]) -> IoAction {
        for element in data.chunks(size.max(1)) {
            match self.io_out(port, element) {
                IoAction::None => {}
                action => return action,
            }
        }
        IoAction::None
    }

    /// A guest `in` from `port` as KVM hands it over: every element of
    /// `size` bytes in `data` (more than one for a string `ins`) is one
    /// access, in order, so that a `rep insb` from the serial port reads
    /// successive bytes of its receive FIFO.
    pub fn pio_in(&mut self, port: u16, size: usize, data: &mut [u8]) {
        for element in data.chunks_mut(size.max(1)) {
            self.io_in(port, element);
        }
    }

    /// One guest `out` of `data` (1, 2 or 4 bytes) to `port`.
    pub fn io_out(&mut self, port: u16, data: &[u8]) -> IoAction {
        match port {
            SERIAL_PORT..=0x3ff => {
                if let Some(&b) = data.first() {
                    // A console that cannot be written must not stop the guest.
                    let _ = self.serial.write((port - SERIAL_PORT) as u8, b);
                }
                IoAction::None
            }
            EXIT_PORT => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                match u32::from_le_bytes(v) {
                    0 => IoAction::PowerOff,
                    code => IoAction::GuestFatal(code),
                }
            }
            I8042_COMMAND if data.first() == Some(&I8042_RESET) => IoAction::Reset,
            _ => IoAction::None,
        }
    }

    /// One guest `in` of `data.len()` (1, 2 or 4) bytes from `port`.
    pub fn io_in(&mut self, port: u16, data: &mut [u8]) {
        match port {
            SERIAL_PORT..=0x3ff => {
                let v = self.serial.read((port - SERIAL_PORT) as u8);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            _ => data.fill(0xff),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_port_and_serial_output() {
        let dir = std::env::temp_dir().join(format!("vmm-dev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        let mut d = Devices::new(EventFd::new(0).unwrap(), Some(&log)).unwrap();
        for b in b"hello\n" {
            assert_eq!(d.io_out(SERIAL_PORT, &[*b]), IoAction::None);
        }
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\n");
        assert_eq!(d.io_out(EXIT_PORT, &[0, 0, 0, 0]), IoAction::PowerOff);
        assert_eq!(d.io_out(EXIT_PORT, &[3, 0, 0, 0]), IoAction::GuestFatal(3));
        assert_eq!(d.io_out(0x64, &[0xfe]), IoAction::Reset);
        let mut b = [0u8; 1];
        d.io_in(0x3fd, &mut b);
        assert_ne!(b[0] & 0x20, 0, "transmitter ready");
        let st = d.serial_state();
        let d2 = Devices::restore(EventFd::new(0).unwrap(), Some(&log), &st).unwrap();
        assert_eq!(d2.serial_state(), st);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A string `outs`/`ins` comes from KVM as `count` elements of `size`
    /// bytes in one slice: each element is its own access, so that every
    /// byte of a `rep outsb` reaches the console, a `rep insb` reads
    /// successive bytes of the receive FIFO, and a `rep outsb` to the exit
    /// or reset port acts on its first byte alone.
    #[test]
    fn string_io_is_one_access_per_element() {
        let dir = std::env::temp_dir().join(format!("vmm-string-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        let mut d = Devices::new(EventFd::new(0).unwrap(), Some(&log)).unwrap();
        assert_eq!(d.pio_out(SERIAL_PORT, 1, b"rep "), IoAction::None);
        // `rep outsw`: the UART takes the low byte of each word.
        assert_eq!(d.pio_out(SERIAL_PORT, 2, b"o\0k\0"), IoAction::None);
        assert_eq!(d.pio_out(SERIAL_PORT, 1, b"\n"), IoAction::None);
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "rep ok\n");

        let mut st = d.serial_state();
        st.in_buffer = b"abcd".to_vec();
        let mut d = Devices::restore(EventFd::new(0).unwrap(), Some(&log), &st).unwrap();
        let mut got = [0u8; 3];
        d.pio_in(SERIAL_PORT, 1, &mut got);
        assert_eq!(&got, b"abc");
        assert_eq!(d.serial_state().in_buffer, b"d");
        // `rep insw`: a byte per word, the high byte 0.
        let mut got = [0xaa; 4];
        d.pio_in(SERIAL_PORT, 2, &mut got);
        assert_eq!(got, [b'd', 0, 0, 0]);
        let mut got = [0u8; 4];
        d.pio_in(0x70, 1, &mut got);
        assert_eq!(got, [0xff; 4], "no device");

        assert_eq!(d.pio_out(EXIT_PORT, 1, &[0, 3]), IoAction::PowerOff);
        assert_eq!(
            d.pio_out(EXIT_PORT, 4, &[3, 0, 0, 0, 0, 0, 0, 0]),
            IoAction::GuestFatal(3)
        );
        assert_eq!(d.pio_out(0x64, 1, &[0x20, I8042_RESET]), IoAction::Reset);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A console past its limit is rotated to `FILE.1` (the one before
    /// replaced), whole lines on either side: a guest that writes without
    /// end takes at most twice the limit of disk.
    #[test]
    fn a_console_past_its_limit_is_rotated() {
        let dir = std::env::temp_dir().join(format!("vmm-rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        let old = dir.join("console.log.1");
        std::fs::write(&log, "from before\n").unwrap();
        let mut w = open_console_up_to(Some(&log), 100).unwrap();
        // 12 bytes there, 10 per line: the 9th line would pass 100.
        for i in 0..8 {
            writeln!(w, "line {i:04}").unwrap();
        }
        assert!(!old.exists(), "rotated early");
        writeln!(w, "line 0008").unwrap();
        let before = std::fs::read_to_string(&old).unwrap();
        assert!(before.starts_with("from before\nline 0000\n"), "{before}");
        assert!(before.ends_with("line 0007\n"), "{before}");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "line 0008\n");
        for i in 9..30 {
            writeln!(w, "line {i:04}").unwrap();
        }
        for f in [&log, &old] {
            let len = std::fs::metadata(f).unwrap().len();
            assert!(len <= 100, "{}: {len} bytes", f.display());
        }
        let newest = std::fs::read_to_string(&log).unwrap();
        assert!(newest.ends_with("line 0029\n"), "{newest}");
        // Not a regular file (a device, a pipe): written to, never renamed.
        let w = open_console_up_to(Some(Path::new("/dev/null")), 10).unwrap();
        assert!(w.path.is_none(), "a device would be rotated");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
