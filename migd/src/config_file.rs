//! The daemon's TOML config file, parsed and checked without touching the system
//! (no file access, no name resolution): the daemon and the `config_parse` fuzz
//! target share [`parse`].

use std::path::PathBuf;

use serde::Deserialize;

/// Default address of the migration listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7070";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/migd";
/// Default `boot_dirs`: where a kernel or initramfs named by a migration's
/// source or a snapshot file may be booted from. Outside the state dir
/// (whose files are never booted from); not `/boot`, whose host initramfs
/// may hold secrets (keys of encrypted disks): an operator adds it knowingly.
pub const DEFAULT_BOOT_DIRS: &[&str] = &["/var/lib/migd-images"];
/// Default nice value of post-copy's page threads (`postcopy_nice`).
pub const DEFAULT_POSTCOPY_NICE: i32 = -10;

/// The config file: every key is optional and has a flag of the same name.
#[derive(Deserialize, Debug, Default, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// TCP address for incoming migrations, `ADDR:PORT`.
    pub listen: Option<String>,
    /// The control socket.
    pub socket: Option<PathBuf>,
    /// VM records, consoles, logs, control sockets, jobs.
    pub state_dir: Option<PathBuf>,
    /// Plaintext, unauthenticated migration streams are allowed.
    pub insecure: Option<bool>,
    /// Address of the Prometheus endpoint (`GET /metrics`), `ADDR:PORT`; off if unset.
    pub metrics_listen: Option<String>,
    /// Host-wide bandwidth cap of outgoing migrations, shared fairly by the
    /// jobs that run at once, e.g. "1G" (bytes/s; a bare number is MiB/s,
    /// written as a string or as a TOML integer).
    #[serde(default, deserialize_with = "string_or_integer")]
    pub max_bandwidth: Option<String>,
    /// CA certificate (PEM) of the fleet.
    pub tls_ca: Option<PathBuf>,
    /// This host's certificate (PEM).
    pub tls_cert: Option<PathBuf>,
    /// This host's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Hosts this one exchanges VMs with (names or IPs in their certificates).
    pub tls_peers: Option<Vec<String>>,
    /// Nice value (-20 to 0) of the threads that move post-copy's pages;
    /// 0 leaves them as they are.
    pub postcopy_nice: Option<i32>,
    /// Entries per vCPU of KVM's dirty ring (a power of two, 256 to 65536);
    /// 0: the bitmap log.
    pub dirty_ring: Option<u32>,
    /// Keep the VMs' memory on huge pages.
    pub hugepages: Option<bool>,
    /// Allocate all of a VM's memory when its process starts.
    pub prefault: Option<bool>,
    /// Directories from which a kernel or initramfs named by a migration's
    /// source or a snapshot file may be booted (absolute paths).
    pub boot_dirs: Option<Vec<PathBuf>>,
}

/// A value given as a string or as a whole number (as its decimal string).
fn string_or_integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Text(String),
        Number(u64),
    }
    Ok(Some(
        match Given::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a string such as \"1G\" or a whole number of MiB/s")
        })? {
            Given::Text(t) => t,
            Given::Number(n) => n.to_string(),
        },
    ))
}

/// Parses and checks a config file's text. The error is one line naming the key
/// and its line (`key 'K' (line N): ...`), or the line alone where no key applies.
pub fn parse(text: &str) -> Result<File, String> {
    let file = toml::from_str::<File>(text).map_err(|e| describe(text, e.span(), e.message()))?;
    let key_err = |key: &str, what: String| {
        let line = key_line(text, key).map_or(String::new(), |n| format!(" (line {n})"));
        format!("key '{key}'{line}: {what}")
    };
    for (key, value) in [
        ("listen", &file.listen),
        ("metrics_listen", &file.metrics_listen),
    ] {
        if let Some(v) = value {
            check_host_port(v).map_err(|what| key_err(key, what))?;
        }
    }
    if let Some(b) = &file.max_bandwidth {
        crate::size::parse_size(b).map_err(|what| key_err("max_bandwidth", what))?;
    }
    if let Some(n) = file.postcopy_nice.filter(|n| !(-20..=0).contains(n)) {
        return Err(key_err(
            "postcopy_nice",
            format!("{n} is not a nice value from -20 to 0"),
        ));
    }
    if let Some(n) = file.dirty_ring.filter(|&n| n != 0) {
        vmm::dirty_ring::check_entries(n).map_err(|e| key_err("dirty_ring", e))?;
    }
    for (key, value) in [("socket", &file.socket), ("state_dir", &file.state_dir)] {
        if value.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(key_err(key, "must not be empty".into()));
        }
    }
    for d in file.boot_dirs.iter().flatten() {
        if !d.is_absolute() {
            return Err(key_err(
                "boot_dirs",
                format!("'{}' is not an absolute path", d.display()),
            ));
        }
    }
    Ok(file)
}

/// Checks the shape `HOST:PORT` (an IPv6 host in brackets), port 0-65535; whether
/// the host resolves is for the caller to find out.
pub fn check_host_port(addr: &str) -> Result<(), String> {
    let bad = || format!("'{}' is not ADDR:PORT", addr.escape_debug());
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty() && !host.contains([':', '[', ']']) && !host.contains(char::is_whitespace)
    };
    if !host_ok || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}

/// The line (1-based) where `key` is assigned at the top level, if it is.
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.split_once('=')
                .is_some_and(|(k, _)| k.trim().trim_matches('"') == key)
        })
        .map(|i| i + 1)
}

/// One line: which key (found from the error's position), which line, what is wrong.
pub fn describe(text: &str, span: Option<std::ops::Range<usize>>, message: &str) -> String {
    let message = message.trim().replace('\n', " ");
    let Some(span) = span else { return message };
    // Bytes, not chars: a span that does not fall on a char boundary must not panic.
    let start = span.start.min(text.len());
    let line_no = text.as_bytes()[..start]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() && !key.trim_start().starts_with('[') => {
            format!("key '{}' (line {line_no}): {message}", key.trim())
        }
        _ => format!("line {line_no}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn errors_name_the_key() {
        let e = parse("listen = \"1.2.3.4:5\"\nbogus = 1\n").unwrap_err();
        assert!(e.contains("key 'bogus' (line 2)"), "{e}");
        let e = parse("insecure = \"yes\"\n").unwrap_err();
        assert!(e.starts_with("key 'insecure' (line 1)"), "{e}");
        assert!(!e.contains('\n'));
        let e = parse("state_dir = 5\n").unwrap_err();
        assert!(e.contains("key 'state_dir'"), "{e}");
        let e = parse("metrics_listen = 9707\n").unwrap_err();
        assert!(e.contains("key 'metrics_listen' (line 1)"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = parse("insecure = true\nmetrics_listen = \"9707\"\n").unwrap_err();
        assert_eq!(e, "key 'metrics_listen' (line 2): '9707' is not ADDR:PORT");
        let e = parse("listen = \"host:99999\"\n").unwrap_err();
        assert!(e.starts_with("key 'listen' (line 1)"), "{e}");
        let e = parse("postcopy_nice = 5\n").unwrap_err();
        assert_eq!(
            e,
            "key 'postcopy_nice' (line 1): 5 is not a nice value from -20 to 0"
        );
        let e = parse("dirty_ring = 1000\n").unwrap_err();
        assert!(
            e.starts_with("key 'dirty_ring' (line 1): 1000 entries: want a power of two"),
            "{e}"
        );
        assert_eq!(parse("dirty_ring = 0\n").unwrap().dirty_ring, Some(0));
        let e = parse("socket = \"\"\n").unwrap_err();
        assert_eq!(e, "key 'socket' (line 1): must not be empty");
        let e = parse("insecure = true\nboot_dirs = [\"/boot\", \"images\"]\n").unwrap_err();
        assert_eq!(
            e,
            "key 'boot_dirs' (line 2): 'images' is not an absolute path"
        );
        let e = parse("boot_dirs = \"/boot\"\n").unwrap_err();
        assert!(e.starts_with("key 'boot_dirs' (line 1)"), "{e}");
        assert_eq!(parse("boot_dirs = []\n").unwrap().boot_dirs, Some(vec![]));
    }

    #[test]
    fn addresses() {
        for ok in ["0.0.0.0:7070", "[::1]:9707", "host-b:1", "127.0.0.1:0"] {
            assert!(check_host_port(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", ":1", "h:", "h:x", "::1:9", "[::1:9", "[x]:1", "a b:1", "h:70000",
        ] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn describe_never_splits_a_char() {
        let text = "é = 1\n";
        for start in 0..=text.len() + 2 {
            let _ = describe(text, Some(start..start), "x");
        }
    }

    #[test]
    fn example_config_has_every_key() {
        let example = include_str!("../dist/migd.toml");
        let f = parse(example).expect("example parses as is");
        assert_eq!(f, File::default());
        let enabled: String = example
            .lines()
            .filter_map(|l| l.strip_prefix("# ").filter(|l| l.contains(" = ")))
            .map(|l| format!("{l}\n"))
            .collect();
        let f = parse(&enabled).expect("example with every key enabled parses");
        assert_eq!(f.listen.as_deref(), Some(DEFAULT_LISTEN));
        assert_eq!(
            f.socket.as_deref(),
            Some(Path::new(crate::client::DEFAULT_SOCKET))
        );
        assert_eq!(f.state_dir.as_deref(), Some(Path::new(DEFAULT_STATE_DIR)));
        assert_eq!(f.insecure, Some(false));
        assert_eq!(f.metrics_listen.as_deref(), Some("127.0.0.1:9707"));
        assert_eq!(f.postcopy_nice, Some(DEFAULT_POSTCOPY_NICE));
        let defaults: Vec<PathBuf> = DEFAULT_BOOT_DIRS.iter().map(PathBuf::from).collect();
        assert_eq!(f.boot_dirs.as_ref(), Some(&defaults));
        // Every field, named so that a new key must be added here (and so to
        // the example) for this to compile.
        let File {
            listen,
            socket,
            state_dir,
            insecure,
            metrics_listen,
            max_bandwidth,
            tls_ca,
            tls_cert,
            tls_key,
            tls_peers,
            postcopy_nice,
            dirty_ring,
            hugepages,
            prefault,
            boot_dirs,
        } = f;
        let set = [
            listen.is_some(),
            socket.is_some(),
            state_dir.is_some(),
            insecure.is_some(),
            metrics_listen.is_some(),
            max_bandwidth.is_some(),
            tls_ca.is_some(),
            tls_cert.is_some(),
            tls_key.is_some(),
            tls_peers.is_some_and(|p| p.len() == 2),
            postcopy_nice.is_some(),
            dirty_ring.is_some(),
            hugepages.is_some(),
            prefault.is_some(),
            boot_dirs.is_some(),
        ];
        assert!(
            set.iter().all(|&s| s),
            "keys missing from the example: {set:?}"
        );
    }

    #[test]
    fn good_file_parses() {
        let f = parse("listen = \"127.0.0.1:1\"\ninsecure = true\n").unwrap();
        assert_eq!(f.listen.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(f.insecure, Some(true));
        assert_eq!(parse("").unwrap(), File::default());
    }

    /// A bare number of MiB/s may be a TOML integer, as the docs invite.
    #[test]
    fn max_bandwidth_as_integer_or_string() {
        for text in ["max_bandwidth = 100", "max_bandwidth = \"100\""] {
            let f = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(f.max_bandwidth.as_deref(), Some("100"), "{text}");
        }
        assert_eq!(
            parse("max_bandwidth = \"1G\"")
                .unwrap()
                .max_bandwidth
                .as_deref(),
            Some("1G")
        );
        for bad in [
            "max_bandwidth = -5",
            "max_bandwidth = 1.5",
            "max_bandwidth = true",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(
                e.contains("max_bandwidth") && e.contains("whole number"),
                "{bad}: {e}"
            );
        }
    }
}
