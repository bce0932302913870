//! Logging set-up for `migd`: `tracing` to stderr, filtered by `RUST_LOG`
//! (default `info`). When stderr is the systemd journal, lines carry neither ANSI
//! colours nor a timestamp (journald records its own and would show the
//! escapes), and each begins with its syslog priority (`<4>` for a warning),
//! which journald reads, so that `journalctl -p warning` finds them. Colours
//! only where stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::os::fd::AsRawFd;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (once, at start).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    if stderr_is_journal() {
        fmt.with_writer(JournalStderr)
            .with_ansi(false)
            .without_time()
            .init();
    } else {
        fmt.with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init();
    }
}

/// The syslog priority journald reads from a line's `<N>` prefix
/// (sd-daemon(3)): error 3, warning 4, info 6, debug 7.
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// The line prefix of a fatal error printed on the way out: `<3>` where
/// stderr is the journal, nothing elsewhere.
pub fn error_prefix() -> &'static str {
    if stderr_is_journal() {
        "<3>"
    } else {
        ""
    }
}

/// Stderr, each event's line prefixed with its syslog priority.
struct JournalStderr;

/// One event's writer: the prefix goes out with its first write.
struct Prefixed {
    prefix: Option<u8>,
}

impl Write for Prefixed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if let Some(p) = self.prefix.take() {
            let mut line = format!("<{p}>").into_bytes();
            line.extend_from_slice(buf);
            err.write_all(&line)?;
            return Ok(buf.len());
        }
        err.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for JournalStderr {
    type Writer = Prefixed;

    fn make_writer(&'a self) -> Prefixed {
        Prefixed { prefix: Some(6) }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Prefixed {
        Prefixed {
            prefix: Some(syslog_priority(meta.level())),
        }
    }
}

/// True when stderr is the stream systemd named in `JOURNAL_STREAM` (`DEV:INODE`).
/// Comparing the device and inode, as sd_journal_stream_fd(3) asks, keeps a child
/// whose stderr was redirected (a VM process writing `vm.log`) from taking the
/// inherited variable for its own.
pub fn stderr_is_journal() -> bool {
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_raw_fd()) else {
        return false;
    };
    #[allow(clippy::unnecessary_cast)] // dev_t and ino_t differ between targets
    let (dev, ino) = (st.st_dev as u64, st.st_ino as u64);
    journal_stream_matches(&var.to_string_lossy(), dev, ino)
}

/// Whether a `JOURNAL_STREAM` value names the file with this device and inode.
pub fn journal_stream_matches(var: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = var.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syslog_priorities_of_the_levels() {
        let p: Vec<u8> = [
            Level::ERROR,
            Level::WARN,
            Level::INFO,
            Level::DEBUG,
            Level::TRACE,
        ]
        .iter()
        .map(syslog_priority)
        .collect();
        assert_eq!(p, vec![3, 4, 6, 7, 7]);
    }

    #[test]
    fn journal_stream_values() {
        assert!(journal_stream_matches("8:1234", 8, 1234));
        assert!(!journal_stream_matches("8:1234", 8, 1235));
        assert!(!journal_stream_matches("8:1234", 9, 1234));
        for bad in ["", "8", "8:", ":1", "x:y", "8:1234:5", "-1:2"] {
            assert!(!journal_stream_matches(bad, 8, 1234), "{bad}");
        }
    }
}
