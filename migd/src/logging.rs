//! Logging set-up for `migd`: `tracing` to stderr, filtered by `RUST_LOG`
//! (default `info`). When stderr is the systemd journal, lines carry neither ANSI
//! colours nor a timestamp: journald records its own and would show the escapes.

use std::os::fd::AsRawFd;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (once, at start).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if stderr_is_journal() {
        fmt.with_ansi(false).without_time().init();
    } else {
        fmt.init();
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
    fn journal_stream_values() {
        assert!(journal_stream_matches("8:1234", 8, 1234));
        assert!(!journal_stream_matches("8:1234", 8, 1235));
        assert!(!journal_stream_matches("8:1234", 9, 1234));
        for bad in ["", "8", "8:", ":1", "x:y", "8:1234:5", "-1:2"] {
            assert!(!journal_stream_matches(bad, 8, 1234), "{bad}");
        }
    }
}
