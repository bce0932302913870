//! TLS options shared by the daemon and `migd run` (which the daemon passes
//! them on to, so that a VM process can open its own migration connections).

use std::path::PathBuf;

use anyhow::{bail, Result};
use link::TlsFiles;

/// `--tls-ca`, `--tls-cert`, `--tls-key`, `--tls-peer` (all three files, or none).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// CA certificate (PEM) that signs the fleet's host certificates.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This host's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This host's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// A host this one exchanges VMs with: a DNS name or IP address its
    /// certificate is valid for (repeat the flag for several).
    #[arg(long = "tls-peer", value_name = "NAME")]
    pub tls_peers: Vec<String>,
}

impl TlsArgs {
    /// The files, if TLS is configured; an error if only some are given.
    pub fn files(&self) -> Result<Option<TlsFiles>> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (None, None, None) if self.tls_peers.is_empty() => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                peers: self.tls_peers.clone(),
            })),
            _ => bail!("TLS needs tls_ca, tls_cert, tls_key and at least one tls_peer together"),
        }
    }

    /// The flags that give `files` to a child process.
    pub fn to_args(files: &TlsFiles) -> Vec<String> {
        let mut a = vec![
            "--tls-ca".to_string(),
            files.ca.to_string_lossy().into_owned(),
            "--tls-cert".into(),
            files.cert.to_string_lossy().into_owned(),
            "--tls-key".into(),
            files.key.to_string_lossy().into_owned(),
        ];
        for p in &files.peers {
            a.push("--tls-peer".into());
            a.push(p.clone());
        }
        a
    }
}
