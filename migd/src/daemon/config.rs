//! Daemon settings: defaults, then the TOML file (`--config`), then flags.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::DaemonArgs;

/// Default address of the migration listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7070";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/migd";

/// The config file: every key is optional and has a flag of the same name.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<String>,
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    insecure: Option<bool>,
}

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
        };
        cfg.listen
            .to_socket_addrs()
            .with_context(|| format!("listen address '{}' (want ADDR:PORT)", cfg.listen))?;
        if cfg.socket.as_os_str().is_empty() || cfg.state_dir.as_os_str().is_empty() {
            bail!("socket and state_dir must not be empty");
        }
        Ok(cfg)
    }
}

fn parse_file(path: &Path) -> Result<File> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    toml::from_str::<File>(&text).map_err(|e| {
        anyhow::anyhow!(
            "config {}: {}",
            path.display(),
            describe(&text, e.span(), e.message())
        )
    })
}

/// One line: which key (found from the error's position), which line, what is wrong.
fn describe(text: &str, span: Option<std::ops::Range<usize>>, message: &str) -> String {
    let message = message.trim().replace('\n', " ");
    let Some(span) = span else { return message };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
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

    fn err(text: &str) -> String {
        let e = toml::from_str::<File>(text).expect_err("should fail");
        describe(text, e.span(), e.message())
    }

    #[test]
    fn errors_name_the_key() {
        let e = err("listen = \"1.2.3.4:5\"\nbogus = 1\n");
        assert!(e.contains("key 'bogus' (line 2)"), "{e}");
        let e = err("insecure = \"yes\"\n");
        assert!(e.starts_with("key 'insecure' (line 1)"), "{e}");
        assert!(!e.contains('\n'));
        let e = err("state_dir = 5\n");
        assert!(e.contains("key 'state_dir'"), "{e}");
    }

    #[test]
    fn example_config_has_every_key() {
        let example = include_str!("../../dist/migd.toml");
        let f: File = toml::from_str(example).expect("example parses as is");
        assert!(f.listen.is_none());
        let enabled: String = example
            .lines()
            .filter_map(|l| l.strip_prefix("# ").filter(|l| l.contains(" = ")))
            .map(|l| format!("{l}\n"))
            .collect();
        let f: File = toml::from_str(&enabled).expect("example with every key enabled parses");
        assert_eq!(f.listen.as_deref(), Some(DEFAULT_LISTEN));
        assert_eq!(
            f.socket.as_deref(),
            Some(Path::new(migd::client::DEFAULT_SOCKET))
        );
        assert_eq!(f.state_dir.as_deref(), Some(Path::new(DEFAULT_STATE_DIR)));
        assert_eq!(f.insecure, Some(false));
    }

    #[test]
    fn good_file_parses() {
        let f: File = toml::from_str("listen = \"127.0.0.1:1\"\ninsecure = true\n").unwrap();
        assert_eq!(f.listen.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(f.insecure, Some(true));
    }
}
