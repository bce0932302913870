//! The TLS 1.3 handshake (rustls), certificate and peer checks, and the hand-off
//! of the session's keys to the record layer.

use std::io::Read;
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ConnectionTrafficSecrets, ServerConfig};

use crate::record::{Opener, Sealer, MAX_PLAIN};
use crate::{io_err, Link, LinkError, Result};

/// How long a handshake may take in all, by default.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a host's TLS material is, and whom it accepts.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// PEM file of the CA that signs the fleet's host certificates.
    pub ca: PathBuf,
    /// PEM file of this host's certificate (chain).
    pub cert: PathBuf,
    /// PEM file of this host's private key.
    pub key: PathBuf,
    /// Names (DNS names or IP addresses in the certificate's subjectAltName) of
    /// the hosts this one accepts connections from.
    pub peers: Vec<String>,
}

/// Loaded TLS configuration: client and server sides share one certificate.
#[derive(Clone)]
pub struct TlsSetup {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    peers: Arc<Vec<String>>,
    /// How long a handshake may take in all, however the peer paces it.
    handshake_timeout: Duration,
    /// Paths, to pass on to another process.
    pub files: TlsFiles,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("files", &self.files)
            .finish()
    }
}

fn certs(path: &PathBuf, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| LinkError::Config(format!("{what} {}: {e}", path.display())))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| LinkError::Config(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(LinkError::Config(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

impl TlsSetup {
    /// Reads and checks the files: CA, certificate and key must parse and match.
    pub fn load(files: &TlsFiles) -> Result<TlsSetup> {
        if files.peers.is_empty() {
            return Err(LinkError::Config(
                "no peers configured: name the hosts this one may exchange VMs with".into(),
            ));
        }
        for p in &files.peers {
            ServerName::try_from(p.as_str())
                .map_err(|_| LinkError::Config(format!("peer '{p}' is not a DNS name or IP")))?;
        }
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(&files.ca, "CA")? {
            roots
                .add(c)
                .map_err(|e| LinkError::Config(format!("CA {}: {e}", files.ca.display())))?;
        }
        let roots = Arc::new(roots);
        let chain = certs(&files.cert, "certificate")?;
        warn_if_readable_by_others(&files.key);
        let key = || {
            PrivateKeyDer::from_pem_file(&files.key)
                .map_err(|e| LinkError::Config(format!("key {}: {e}", files.key.display())))
        };
        let mut p = provider::default_provider();
        // AES-GCM first: the CPU's AES instructions make it the fastest here.
        p.cipher_suites = vec![
            provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
            provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
            provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ];
        let p = Arc::new(p);
        let cfg_err = |e: rustls::Error| LinkError::Config(e.to_string());
        let mut client = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg_err)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key()?)
            .map_err(|e| LinkError::Config(format!("certificate and key: {e}")))?;
        client.enable_secret_extraction = true;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, p.clone())
                .build()
                .map_err(|e| LinkError::Config(format!("client verifier: {e}")))?;
        let mut server = ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key()?)
            .map_err(|e| LinkError::Config(format!("certificate and key: {e}")))?;
        server.enable_secret_extraction = true;
        // Nothing may follow the handshake but our records.
        server.send_tls13_tickets = 0;
        Ok(TlsSetup {
            client: Arc::new(client),
            server: Arc::new(server),
            peers: Arc::new(files.peers.clone()),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            files: files.clone(),
        })
    }

    /// This setup with handshakes limited to `limit` in all (10 s by default).
    pub fn with_handshake_timeout(mut self, limit: Duration) -> TlsSetup {
        self.handshake_timeout = limit;
        self
    }

    /// TLS client on `tcp`, verifying that the peer's certificate is valid for
    /// `host` (the DNS name or IP address that was dialled).
    pub fn connect(&self, tcp: TcpStream, host: &str) -> Result<Link> {
        let peer = peer_name(&tcp);
        let name = ServerName::try_from(host.to_string()).map_err(|_| LinkError::Handshake {
            peer: peer.clone(),
            reason: format!("'{host}' is not a DNS name or IP address"),
        })?;
        let conn = ClientConnection::new(self.client.clone(), name)
            .map_err(|e| handshake_err(&peer, e.to_string()))?;
        let mut conn = rustls::Connection::Client(conn);
        let end = Instant::now() + self.handshake_timeout;
        handshake(&mut conn, &tcp, &peer, end, self.handshake_timeout)?;
        into_link(conn, tcp, host.to_string(), &peer)
    }

    /// TLS server on an accepted `tcp`: the peer must present a certificate
    /// from the CA that names one of the configured peers.
    pub fn accept(&self, tcp: TcpStream) -> Result<Link> {
        self.accept_if(tcp, &self.peers.join(", "), |ee| self.matching_peer(ee))
    }

    /// As [`TlsSetup::accept`], for a connection within a migration whose
    /// main link authenticated its peer as `name` (the name a source dialed,
    /// or the configured peer a destination matched): the certificate must be
    /// valid for that name, not merely for some configured peer (another
    /// host of the fleet, behind the same address, is no stand-in).
    pub fn accept_named(&self, tcp: TcpStream, name: &str) -> Result<Link> {
        self.accept_if(tcp, name, |ee| {
            valid_for(ee, name).then(|| name.to_string())
        })
    }

    /// The handshake of [`TlsSetup::accept`]; `identity` names who the
    /// peer's certificate proves it is, if allowed (`allowed` says who is,
    /// in the error).
    fn accept_if(
        &self,
        tcp: TcpStream,
        allowed: &str,
        identity: impl Fn(&CertificateDer<'_>) -> Option<String>,
    ) -> Result<Link> {
        let peer = peer_name(&tcp);
        // The handshake's limit counts from here, the wait for its first
        // bytes included.
        let end = Instant::now() + self.handshake_timeout;
        if !looks_like_tls_within(&tcp, self.handshake_timeout)
            .map_err(io_err(format!("reading from {peer}")))?
        {
            return Err(LinkError::PlaintextPeer { peer });
        }
        let conn = rustls::ServerConnection::new(self.server.clone())
            .map_err(|e| handshake_err(&peer, e.to_string()))?;
        let mut conn = rustls::Connection::Server(conn);
        handshake(&mut conn, &tcp, &peer, end, self.handshake_timeout)?;
        let identity = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(identity);
        match identity {
            Some(id) => into_link(conn, tcp, id, &peer),
            None => Err(LinkError::NotAPeer {
                peer: peer.clone(),
                allowed: allowed.to_string(),
                link: Box::new(into_link(conn, tcp, String::new(), &peer)?),
            }),
        }
    }

    /// The configured peer name that certificate `ee` is valid for.
    fn matching_peer(&self, ee: &CertificateDer<'_>) -> Option<String> {
        self.peers
            .iter()
            .find(|p| valid_for(ee, p))
            .map(|p| p.to_string())
    }
}

/// Whether certificate `ee` (verified against the CA already) is valid for
/// `name`, a DNS name or IP address.
fn valid_for(ee: &CertificateDer<'_>, name: &str) -> bool {
    let (Ok(cert), Ok(name)) = (
        webpki::EndEntityCert::try_from(ee),
        ServerName::try_from(name),
    ) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

fn peer_name(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "the peer".into())
}

/// Warns where the private key at `path` can be read by others than its
/// owner (as ssh refuses such a key): it is the host's identity toward
/// every peer.
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        let mode = m.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                key = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the TLS private key can be read by others than its owner: chmod 600 it"
            );
        }
    }
}

fn handshake_err(peer: &str, reason: String) -> LinkError {
    LinkError::Handshake {
        peer: peer.to_string(),
        reason,
    }
}

/// True when the first bytes waiting on `tcp` are a TLS handshake record
/// (waits up to the handshake timeout for them; peeks, consumes nothing).
pub fn looks_like_tls(tcp: &TcpStream) -> std::io::Result<bool> {
    looks_like_tls_within(tcp, HANDSHAKE_TIMEOUT)
}

/// [`looks_like_tls`], waiting up to `limit`.
fn looks_like_tls_within(tcp: &TcpStream, limit: Duration) -> std::io::Result<bool> {
    let old = tcp.read_timeout()?;
    tcp.set_read_timeout(Some(limit.max(Duration::from_millis(1))))?;
    let mut b = [0u8; 3];
    let mut n = 0;
    let r = loop {
        match tcp.peek(&mut b) {
            Ok(k) if k >= 3 || k == n => break Ok(k),
            Ok(k) => {
                // Fewer bytes than asked for so far: give the peer a moment.
                n = k;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => break Err(e),
        }
    };
    tcp.set_read_timeout(old)?;
    let n = r?;
    Ok(n >= 3 && b[0] == 0x16 && b[1] == 3 && b[2] <= 4)
}

/// Reads from a socket with what is left until `end` as each read's
/// timeout, so that a peer that trickles its bytes (each read in time) still
/// meets the end.
struct Until<'a> {
    tcp: &'a TcpStream,
    end: Instant,
    limit: Duration,
}

impl Read for Until<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let too_late = || {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("not done within {:?}", self.limit),
            )
        };
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(too_late());
        }
        self.tcp.set_read_timeout(Some(left))?;
        let mut tcp = self.tcp;
        // The socket's timeout is what was left: its expiry is the limit's.
        tcp.read(b).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => too_late(),
            _ => e,
        })
    }
}

/// Runs the handshake to its end, one record at a time, so that nothing the
/// peer sends after it is read into rustls; by `end` (`limit` from its start).
fn handshake(
    conn: &mut rustls::Connection,
    tcp: &TcpStream,
    peer: &str,
    end: Instant,
    limit: Duration,
) -> Result<()> {
    let old = tcp.read_timeout().map_err(io_err("socket"))?;
    let mut input = Until { tcp, end, limit };
    let mut tcp = tcp;
    let mut record = vec![0u8; 5 + MAX_PLAIN + 2048];
    loop {
        while conn.wants_write() {
            conn.write_tls(&mut tcp)
                .map_err(io_err(format!("TLS handshake with {peer}")))?;
        }
        if !conn.is_handshaking() {
            break;
        }
        let mut got = 0;
        while got < 5 {
            match input.read(&mut record[got..5]) {
                Ok(0) => {
                    return Err(handshake_err(
                        peer,
                        if got == 0 {
                            "the peer closed the connection (is it configured for TLS?)".into()
                        } else {
                            "the connection ended inside a record".into()
                        },
                    ))
                }
                Ok(k) => got += k,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Err(handshake_err(
                        peer,
                        "the peer closed the connection (is it configured for TLS?)".into(),
                    ))
                }
                Err(e) => return Err(io_err(format!("TLS handshake with {peer}"))(e)),
            }
        }
        if !matches!(record[0], 0x14..=0x17) || record[1] != 3 {
            return Err(handshake_err(
                peer,
                "the peer answered in plaintext: it is not configured for TLS".into(),
            ));
        }
        let len = u16::from_be_bytes([record[3], record[4]]) as usize;
        if len > record.len() - 5 {
            return Err(handshake_err(peer, format!("record of {len} bytes")));
        }
        input
            .read_exact(&mut record[5..5 + len])
            .map_err(io_err(format!("TLS handshake with {peer}")))?;
        let mut slice = &record[..5 + len];
        while !slice.is_empty() {
            conn.read_tls(&mut slice)
                .map_err(io_err(format!("TLS handshake with {peer}")))?;
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (the alert), then fail.
            while conn.wants_write() {
                if conn.write_tls(&mut tcp).is_err() {
                    break;
                }
            }
            return Err(handshake_err(peer, e.to_string()));
        }
    }
    tcp.set_read_timeout(old).map_err(io_err("socket"))?;
    Ok(())
}

fn keys(s: ConnectionTrafficSecrets) -> std::result::Result<(u8, Vec<u8>, Vec<u8>), String> {
    match s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            Ok((0, key.as_ref().to_vec(), iv.as_ref().to_vec()))
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            Ok((1, key.as_ref().to_vec(), iv.as_ref().to_vec()))
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            Ok((2, key.as_ref().to_vec(), iv.as_ref().to_vec()))
        }
        _ => Err("unsupported cipher suite".into()),
    }
}

fn into_link(
    conn: rustls::Connection,
    tcp: TcpStream,
    identity: String,
    peer: &str,
) -> Result<Link> {
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| handshake_err(peer, format!("taking the session keys: {e}")))?;
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    let (suite, key, iv) = keys(tx).map_err(|e| handshake_err(peer, e))?;
    let sealer = Sealer::new(suite, &key, &iv, tx_seq).map_err(|e| handshake_err(peer, e))?;
    let (suite, key, iv) = keys(rx).map_err(|e| handshake_err(peer, e))?;
    let opener = Opener::new(suite, &key, &iv, rx_seq).map_err(|e| handshake_err(peer, e))?;
    Ok(Link::secure(tcp, sealer, opener, identity))
}
