//! General compression of page data on the wire (option `compress`): `none`,
//! or zstd at a level, as QEMU's `multifd-compression`/`multifd-zstd-level`.
//! Worth it only when the link is slower than the CPU compresses (a capped or
//! WAN link); on a fast local link it costs more time than it saves.

use std::fmt;
use std::str::FromStr;

/// The zstd level when `zstd` is given without one (fast; QEMU's default).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// How page batches are compressed on the wire (pre-copy rounds and the
/// stop-and-copy; post-copy pages stay raw for fault latency).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Pages travel raw (the default).
    #[default]
    None,
    /// zstd at `level` (1..=19); needs the destination's capability `zstd`.
    Zstd {
        /// zstd compression level.
        level: i32,
    },
}

/// A `compress` value that is not `none` or `zstd[:1..=19]`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "bad compress value '{0}': use none or zstd[:LEVEL] with LEVEL 1..=19 (zstd alone is level 1)"
)]
pub struct BadCompression(pub String);

impl FromStr for Compression {
    type Err = BadCompression;

    fn from_str(s: &str) -> Result<Self, BadCompression> {
        let bad = || BadCompression(s.escape_debug().to_string());
        match s.split_once(':') {
            None if s == "none" => Ok(Compression::None),
            None if s == "zstd" => Ok(Compression::Zstd {
                level: DEFAULT_ZSTD_LEVEL,
            }),
            Some(("zstd", l)) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
                let level: i32 = l.parse().map_err(|_| bad())?;
                if wire::ZSTD_LEVELS.contains(&level) {
                    Ok(Compression::Zstd { level })
                } else {
                    Err(bad())
                }
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

impl Compression {
    /// The algorithm's name in statistics (`none`, `zstd`).
    pub fn algorithm(&self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd { .. } => "zstd",
        }
    }

    /// The level (0 for `none`).
    pub fn level(&self) -> i32 {
        match self {
            Compression::None => 0,
            Compression::Zstd { level } => *level,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_none_and_zstd_levels_and_refuses_the_rest() {
        assert_eq!("none".parse(), Ok(Compression::None));
        assert_eq!("zstd".parse(), Ok(Compression::Zstd { level: 1 }));
        assert_eq!("zstd:3".parse(), Ok(Compression::Zstd { level: 3 }));
        assert_eq!("zstd:19".parse(), Ok(Compression::Zstd { level: 19 }));
        for bad in [
            "zstd:0",
            "zstd:30",
            "zstd:20",
            "lz5",
            "",
            "zstd:",
            "zstd:-1",
            "zstd:+3",
            "zstd:3:4",
            "ZSTD",
            "none:1",
            "zstd:99999999999",
        ] {
            let e = bad.parse::<Compression>().unwrap_err();
            assert!(e.to_string().contains("1..=19"), "{bad}: {e}");
        }
        assert_eq!(Compression::Zstd { level: 3 }.to_string(), "zstd:3");
        assert_eq!(Compression::None.to_string(), "none");
    }
}
