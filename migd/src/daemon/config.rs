//! Daemon settings: defaults, then the TOML file (`--config`), then flags.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use migd::config_file::{self, File};

pub use migd::config_file::{DEFAULT_LISTEN, DEFAULT_STATE_DIR};

use super::DaemonArgs;

/// Effective settings of a daemon.
#[derive(Debug, Clone)]
pub struct Config {
    /// TCP address for incoming migrations.
    pub listen: String,
    /// The control socket (JSON lines).
    pub socket: PathBuf,
    /// VM records, consoles, logs, control sockets, jobs.
    pub state_dir: PathBuf,
    /// Plaintext, unauthenticated migration streams are allowed.
    pub insecure: bool,
    /// Address of the Prometheus endpoint; None: no endpoint.
    pub metrics_listen: Option<String>,
    /// TLS for migration streams; None: plaintext (only with `insecure`).
    pub tls: Option<link::TlsFiles>,
    /// Host-wide cap of outgoing migrations, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// Nice value of post-copy's page threads in VM processes (0: unchanged).
    pub postcopy_nice: i32,
    /// Dirty-ring entries per vCPU in VM processes (0: the bitmap log).
    pub dirty_ring: u32,
    /// VM processes keep guest memory on huge pages.
    pub hugepages: bool,
    /// VM processes allocate all of guest memory when they start.
    pub prefault: bool,
    /// Where a kernel or initramfs named by a peer or a snapshot file may
    /// be taken from (absolute paths).
    pub boot_dirs: Vec<PathBuf>,
}

#[cfg(test)]
impl Config {
    /// Plaintext on loopback, state under `state_dir`, every option off.
    pub fn for_tests(state_dir: &std::path::Path) -> Config {
        Config {
            listen: "127.0.0.1:0".into(),
            socket: state_dir.join("migd.sock"),
            state_dir: state_dir.to_path_buf(),
            insecure: true,
            metrics_listen: None,
            tls: None,
            max_bandwidth: None,
            postcopy_nice: 0,
            dirty_ring: 0,
            hugepages: false,
            prefault: false,
            boot_dirs: Vec::new(),
        }
    }
}

impl Config {
    /// Merges defaults, the config file and flags (flags win).
    pub fn load(args: &DaemonArgs) -> Result<Config> {
        let file = match &args.config {
            Some(p) => parse_file(p)?,
            None => File::default(),
        };
        let cfg = Config {
            listen: args
                .listen
                .clone()
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.to_string()),
            socket: args
                .socket
                .clone()
                .or(file.socket)
                .unwrap_or_else(|| PathBuf::from(migd::client::DEFAULT_SOCKET)),
            state_dir: args
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            insecure: args.insecure || file.insecure.unwrap_or(false),
            metrics_listen: args.metrics_listen.clone().or(file.metrics_listen),
            max_bandwidth: match (args.max_bandwidth, &file.max_bandwidth) {
                (Some(b), _) => Some(host_cap(b).context("--max-bandwidth")?),
                (None, Some(s)) => Some(
                    migd::size::parse_size(s)
                        .map_err(anyhow::Error::msg)
                        .and_then(host_cap)
                        .with_context(|| config_key(args, "max_bandwidth"))?,
                ),
                (None, None) => None,
            },
            postcopy_nice: args
                .postcopy_nice
                .or(file.postcopy_nice)
                .unwrap_or(config_file::DEFAULT_POSTCOPY_NICE),
            dirty_ring: match (args.dirty_ring, file.dirty_ring) {
                (Some(n), _) => dirty_ring(n).context("--dirty-ring")?,
                (None, Some(n)) => dirty_ring(n).with_context(|| config_key(args, "dirty_ring"))?,
                (None, None) => 0,
            },
            hugepages: args.hugepages || file.hugepages.unwrap_or(false),
            prefault: args.prefault || file.prefault.unwrap_or(false),
            // Flags replace the file's list, as --tls-peer does.
            boot_dirs: if args.boot_dirs.is_empty() {
                file.boot_dirs.unwrap_or_else(|| {
                    config_file::DEFAULT_BOOT_DIRS
                        .iter()
                        .map(PathBuf::from)
                        .collect()
                })
            } else {
                if let Some(d) = args.boot_dirs.iter().find(|d| !d.is_absolute()) {
                    bail!("--boot-dir {}: not an absolute path", d.display());
                }
                args.boot_dirs.clone()
            },
            tls: migd::tls_args::TlsArgs {
                tls_ca: args.tls.tls_ca.clone().or(file.tls_ca),
                tls_cert: args.tls.tls_cert.clone().or(file.tls_cert),
                tls_key: args.tls.tls_key.clone().or(file.tls_key),
                tls_peers: if args.tls.tls_peers.is_empty() {
                    file.tls_peers.unwrap_or_default()
                } else {
                    args.tls.tls_peers.clone()
                },
            }
            .files()?,
        };
        cfg.listen
            .to_socket_addrs()
            .with_context(|| format!("listen address '{}' (want ADDR:PORT)", cfg.listen))?;
        if let Some(m) = &cfg.metrics_listen {
            config_file::check_host_port(m)
                .map_err(anyhow::Error::msg)
                .and_then(|()| m.to_socket_addrs().map_err(anyhow::Error::from))
                .with_context(|| format!("metrics listen address '{m}' (want ADDR:PORT)"))?;
        }
        if cfg.socket.as_os_str().is_empty() || cfg.state_dir.as_os_str().is_empty() {
            bail!("socket and state_dir must not be empty");
        }
        Ok(cfg)
    }
}

/// A host-wide bandwidth cap (bytes/s): 0, or a rate that rounds down to it, is
/// refused rather than read as "no cap".
fn host_cap(bytes_per_s: u64) -> Result<u64> {
    if bytes_per_s == 0 {
        bail!(
            "a cap of 0 bytes/s would stop every migration; leave max_bandwidth \
             (--max-bandwidth) out for no cap"
        );
    }
    Ok(bytes_per_s)
}

/// Dirty-ring entries per vCPU, checked as the VM processes will (0: the bitmap log),
/// so that a bad value stops the daemon rather than every VM it starts.
fn dirty_ring(entries: u32) -> Result<u32> {
    if entries != 0 {
        vmm::dirty_ring::check_entries(entries).map_err(anyhow::Error::msg)?;
    }
    Ok(entries)
}

/// Context of an error in a value from the config file.
fn config_key(args: &DaemonArgs, key: &str) -> String {
    let path = args.config.as_deref().unwrap_or(Path::new("?"));
    format!("config {}: key '{key}'", path.display())
}

fn parse_file(path: &Path) -> Result<File> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    config_file::parse(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `file` as the config file, with `args` as the flags.
    fn load_with(file: &str, args: DaemonArgs) -> Result<Config> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("migd-config-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, file).expect("writing the config");
        let cfg = Config::load(&DaemonArgs {
            config: Some(path.clone()),
            ..args
        });
        let _ = std::fs::remove_file(&path);
        cfg
    }

    fn err(r: Result<Config>) -> String {
        format!("{:#}", r.expect_err("the config should be refused"))
    }

    #[test]
    fn zero_bandwidth_is_refused() {
        for (file, flag) in [("", Some(0)), ("max_bandwidth = \"0\"\n", None)] {
            let e = err(load_with(
                file,
                DaemonArgs {
                    max_bandwidth: flag,
                    ..Default::default()
                },
            ));
            assert!(
                e.contains("0 bytes/s") && e.contains("out for no cap"),
                "{e}"
            );
        }
        // Rounds down to 0 bytes/s.
        let e = err(load_with(
            "max_bandwidth = \"0.5B\"\n",
            DaemonArgs::default(),
        ));
        assert!(e.contains("key 'max_bandwidth'"), "{e}");
        let cfg = load_with("max_bandwidth = \"1G\"\n", DaemonArgs::default()).unwrap();
        assert_eq!(cfg.max_bandwidth, Some(1 << 30));
        let cfg = load_with("", DaemonArgs::default()).unwrap();
        assert_eq!(cfg.max_bandwidth, None);
    }

    #[test]
    fn dirty_ring_flag_is_checked() {
        for n in [100, 128, 1 << 20] {
            let e = err(load_with(
                "",
                DaemonArgs {
                    dirty_ring: Some(n),
                    ..Default::default()
                },
            ));
            assert!(
                e.starts_with("--dirty-ring: ") && e.contains("power of two"),
                "{e}"
            );
        }
        for (n, want) in [(Some(0), 0), (Some(4096), 4096), (None, 0)] {
            let args = DaemonArgs {
                dirty_ring: n,
                ..Default::default()
            };
            assert_eq!(load_with("", args).unwrap().dirty_ring, want);
        }
        // The flag wins over the file, and is checked on its own.
        let args = DaemonArgs {
            dirty_ring: Some(512),
            ..Default::default()
        };
        assert_eq!(
            load_with("dirty_ring = 1024\n", args).unwrap().dirty_ring,
            512
        );
    }
}
