//! Migration links: a TCP stream, plaintext or protected with the keys of a
//! mutually authenticated TLS 1.3 handshake.
//!
//! rustls does the handshake and the certificate checks (both sides present a
//! certificate signed by the fleet's CA; the accepting side also requires the
//! peer's certificate to name one of its configured peers). Then, in the
//! manner of the kernel's kTLS, the session's traffic keys are taken out of
//! rustls and records are sealed and opened here, in the TLS 1.3 record format
//! with the negotiated AEAD (AES-GCM, which uses the CPU's AES instructions).
//! That keeps a link one socket whose read and write halves can be used from
//! different threads ([`Link::try_clone`]) and handed to another process
//! ([`Link::export`]) — which a rustls connection object cannot.

mod record;
mod tls;

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use tls::{looks_like_tls, TlsFiles, TlsSetup};

use record::{Opener, Sealer};

/// Errors of link set-up. Each names its cause in its message (no `source()`).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A socket operation failed.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        cause: io::Error,
    },
    /// A certificate, key or CA file is missing or unusable.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The TLS handshake failed (untrusted or expired certificate, wrong name, ...).
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake {
        /// The peer's address.
        peer: String,
        /// What went wrong, as rustls or the peer's alert says it.
        reason: String,
    },
    /// The peer's certificate is valid but names none of the configured peers.
    /// The link is up, so that the caller can say so in its own protocol.
    #[error("{peer} presented a valid certificate, but not for any configured peer ({allowed})")]
    NotAPeer {
        /// The peer's address.
        peer: String,
        /// The configured peer names.
        allowed: String,
        /// The established link, to send a refusal on.
        link: Box<Link>,
    },
    /// A plaintext peer connected to a port that requires TLS.
    #[error("{peer} speaks plaintext, but this host accepts migrations only over TLS")]
    PlaintextPeer {
        /// The peer's address.
        peer: String,
    },
    /// An exported link could not be imported.
    #[error("importing a link: {0}")]
    Import(String),
}

/// Result with [`LinkError`].
pub type Result<T> = std::result::Result<T, LinkError>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> LinkError {
    let context = context.into();
    move |cause| LinkError::Io { context, cause }
}

/// The protection of a TLS link: one sealer and one opener shared by every clone.
struct Secure {
    tx: Mutex<Sealer>,
    rx: Mutex<Opener>,
    /// The peer's identity: the configured peer name its certificate matched
    /// (accepting side) or the name it was verified for (connecting side).
    peer: String,
}

/// A migration connection: plaintext, or TLS-protected.
pub struct Link {
    tcp: TcpStream,
    secure: Option<Arc<Secure>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.tcp.peer_addr().ok())
            .field("secure", &self.is_secure())
            .field("identity", &self.peer_identity())
            .finish()
    }
}

impl Link {
    /// A plaintext link (only with an explicit `--insecure`).
    pub fn plain(tcp: TcpStream) -> Link {
        Link { tcp, secure: None }
    }

    fn secure(tcp: TcpStream, tx: Sealer, rx: Opener, peer: String) -> Link {
        Link {
            tcp,
            secure: Some(Arc::new(Secure {
                tx: Mutex::new(tx),
                rx: Mutex::new(rx),
                peer,
            })),
        }
    }

    /// True when the link is TLS-protected.
    pub fn is_secure(&self) -> bool {
        self.secure.is_some()
    }

    /// The authenticated identity of the peer (TLS links only).
    pub fn peer_identity(&self) -> Option<&str> {
        self.secure.as_ref().map(|s| s.peer.as_str())
    }

    /// Another handle on the same link (for a reader and a writer thread).
    /// Records are sealed and opened under per-direction locks, so writes from
    /// several threads stay whole; reads should come from one thread at a time.
    pub fn try_clone(&self) -> io::Result<Link> {
        Ok(Link {
            tcp: self.tcp.try_clone()?,
            secure: self.secure.clone(),
        })
    }

    /// Shuts down the socket (all clones).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.tcp.shutdown(how)
    }

    /// `TCP_NODELAY`.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp.set_nodelay(on)
    }

    /// Read timeout of the socket. On a TLS link a read that times out in the
    /// middle of a record breaks the link: use timeouts only to give up.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(t)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }

    /// Our address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The TCP socket underneath (socket options, `poll`).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The link's session state for another process that inherits the socket
    /// (`None` for a plaintext link). Only between messages: fails if received
    /// data is still buffered.
    pub fn export(&self) -> Result<Option<Vec<u8>>> {
        let Some(s) = &self.secure else {
            return Ok(None);
        };
        let rx = s.rx.lock().unwrap_or_else(|p| p.into_inner());
        if rx.buffered() > 0 {
            return Err(LinkError::Import(
                "received data is still buffered; export only between messages".into(),
            ));
        }
        let tx = s.tx.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        tx.export(&mut out);
        rx.export(&mut out);
        out.extend_from_slice(s.peer.as_bytes());
        Ok(Some(out))
    }

    /// Rebuilds a link exported by [`Link::export`] on the inherited socket `tcp`.
    pub fn import(tcp: TcpStream, state: Option<&[u8]>) -> Result<Link> {
        let Some(mut b) = state else {
            return Ok(Link::plain(tcp));
        };
        let tx = Sealer::import(&mut b).map_err(LinkError::Import)?;
        let rx = Opener::import(&mut b).map_err(LinkError::Import)?;
        let peer = String::from_utf8(b.to_vec())
            .map_err(|_| LinkError::Import("peer name is not UTF-8".into()))?;
        Ok(Link::secure(tcp, tx, rx, peer))
    }
}

/// Opens `data` as a stream of records sealed with a fixed test key and
/// returns the plaintext bytes read before the first error or the end (for the
/// `link_records` fuzz target and tests: the record layer must never panic).
pub fn open_records_for_fuzzing(data: &[u8]) -> usize {
    let Ok(mut o) = Opener::new(0, &[7; 16], &[9; 12], 0) else {
        return 0;
    };
    let mut r = data;
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while let Ok(n) = o.read(&mut r, &mut buf) {
        if n == 0 {
            break;
        }
        total += n;
    }
    total
}

/// Seals `data` with the key of [`open_records_for_fuzzing`] (seed corpora).
pub fn seal_records_for_fuzzing(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if let Ok(mut s) = Sealer::new(0, &[7; 16], &[9; 12], 0) {
        let mut off = 0;
        while off < data.len() {
            match s.write(&mut out, &[IoSlice::new(&data[off..])]) {
                Ok(n) if n > 0 => off += n,
                _ => break,
            }
        }
    }
    out
}

impl AsRawFd for Link {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.secure {
            None => self.tcp.read(buf),
            Some(s) => {
                let mut rx = s.rx.lock().unwrap_or_else(|p| p.into_inner());
                rx.read(&mut self.tcp, buf)
            }
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match &self.secure {
            None => self.tcp.write_vectored(bufs),
            Some(s) => {
                let mut tx = s.tx.lock().unwrap_or_else(|p| p.into_inner());
                tx.write(&mut self.tcp, bufs)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}
