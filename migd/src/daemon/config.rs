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
                (Some(b), _) => Some(b),
                (None, Some(s)) => Some(migd::size::parse_size(s).map_err(anyhow::Error::msg)?),
                (None, None) => None,
            }
            .filter(|&b| b > 0),
            postcopy_nice: args
                .postcopy_nice
                .or(file.postcopy_nice)
                .unwrap_or(config_file::DEFAULT_POSTCOPY_NICE),
            dirty_ring: args.dirty_ring.or(file.dirty_ring).unwrap_or(0),
            hugepages: args.hugepages || file.hugepages.unwrap_or(false),
            prefault: args.prefault || file.prefault.unwrap_or(false),
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

fn parse_file(path: &Path) -> Result<File> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    config_file::parse(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
}
