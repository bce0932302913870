//! The source's listener for a migration's extra connections (multifd page
//! streams, the post-copy fault channel), which the destination opens back to
//! it.
//!
//! Only the destination's address is let in. Each connection's TLS handshake
//! and first message are read in a thread of its own, so a silent or slow
//! stranger holds up nobody. The fault channel is joined inside the pause,
//! where a wait on one stranger's read timeout would be downtime.
//!
//! The destination's post-copy recovery listener uses it the same way, for
//! the source's reconnections.

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use link::{Link, TlsSetup};
use wire::Message;

use crate::{io_err, precopy, Result};

/// Connections whose first message is awaited at once; more are dropped.
const MAX_IN_FLIGHT: usize = 16;

/// A connection that introduced itself: the link, its first message, who.
pub(crate) struct Greeting {
    /// The connection, TLS set up when the migration uses it.
    pub link: Link,
    /// Its first control message.
    pub hello: Message,
    /// Where it came from.
    pub peer: SocketAddr,
}

/// What [`Doorman::next`] found.
pub(crate) enum Arrival {
    /// A connection and its first message.
    Greeted(Greeting),
    /// The `interrupt` descriptor became readable.
    Interrupted,
    /// `end` passed.
    TimedOut,
}

/// Accepts connections from one address and reads their first messages.
pub(crate) struct Doorman {
    listener: TcpListener,
    peer: IpAddr,
    tls: Option<TlsSetup>,
    expected: &'static str,
    hello_timeout: Duration,
    greetings: mpsc::Receiver<Greeting>,
    sender: mpsc::Sender<Greeting>,
    /// Written by a greeter thread when it is done, so that `poll` wakes.
    wake: (std::io::PipeReader, Arc<std::io::PipeWriter>),
    in_flight: Arc<AtomicUsize>,
    /// What the peer is to a connection from another address that is told
    /// why it is dropped (a `Refuse`, over plain TCP only: over TLS a stranger
    /// gets no word before a handshake it cannot pass); `None`: no word.
    peer_role: Option<&'static str>,
    /// The name the main link's peer proved over TLS: an extra connection's
    /// certificate must be valid for it too (another host of the fleet
    /// behind the same address is no stand-in).
    identity: Option<String>,
}

impl Doorman {
    /// A doorman on `listener` for connections from `peer` whose first message
    /// (named `expected` in errors) must arrive within `hello_timeout`.
    pub fn new(
        listener: TcpListener,
        peer: IpAddr,
        tls: Option<TlsSetup>,
        expected: &'static str,
        hello_timeout: Duration,
    ) -> Result<Doorman> {
        listener
            .set_nonblocking(true)
            .map_err(io_err("migration listener"))?;
        let (r, w) = std::io::pipe().map_err(io_err("wake-up pipe"))?;
        set_nonblocking(r.as_raw_fd())?;
        set_nonblocking(w.as_raw_fd())?;
        let (sender, greetings) = mpsc::channel();
        Ok(Doorman {
            listener,
            peer,
            tls,
            expected,
            hello_timeout,
            greetings,
            sender,
            wake: (r, Arc::new(w)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            peer_role: None,
            identity: None,
        })
    }

    /// This doorman lets in only connections whose certificate is valid for
    /// `identity` (the main link's peer, over TLS; `None`: plain TCP).
    pub fn requiring_identity(mut self, identity: Option<&str>) -> Doorman {
        self.identity = identity.map(str::to_string);
        self
    }

    /// This doorman tells a connection from another address, over plain TCP,
    /// that it is not the migration's `role` (say "source").
    pub fn telling_strangers(mut self, role: &'static str) -> Doorman {
        self.peer_role = Some(role);
        self
    }

    /// Waits until `end` for the next connection that introduced itself, or
    /// for `interrupt` (say the main connection) to have something to read.
    pub fn next(&mut self, end: Instant, interrupt: Option<RawFd>) -> Result<Arrival> {
        loop {
            if let Ok(g) = self.greetings.try_recv() {
                return Ok(Arrival::Greeted(g));
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Arrival::TimedOut);
            }
            let mut pfd = [self.listener.as_raw_fd(), self.wake.0.as_raw_fd()]
                .into_iter()
                .chain(interrupt)
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect::<Vec<_>>();
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
            // SAFETY: valid pollfds, their count passed with them.
            unsafe { libc::poll(pfd.as_mut_ptr(), pfd.len() as libc::nfds_t, ms) };
            if pfd.get(2).is_some_and(|p| p.revents != 0) {
                return Ok(Arrival::Interrupted);
            }
            if pfd[1].revents != 0 {
                let mut sink = [0u8; 64];
                while matches!((&self.wake.0).read(&mut sink), Ok(n) if n > 0) {}
            }
            if pfd[0].revents != 0 {
                self.accept_all()?;
            }
        }
    }

    /// Accepts what is queued on the listener; each admitted connection gets a
    /// greeter thread.
    fn accept_all(&mut self) -> Result<()> {
        loop {
            let (s, peer) = match self.listener.accept() {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(io_err("migration listener")(e)),
            };
            if peer.ip() != self.peer {
                tracing::warn!(%peer, expected = %self.peer, "connection from a stranger: dropped");
                if let (Some(role), None) = (self.peer_role, &self.tls) {
                    let reason = format!(
                        "{} is not this migration's {role} ({})",
                        peer.ip(),
                        self.peer
                    );
                    refuse_without_waiting(s, reason);
                }
                continue;
            }
            if self.in_flight.load(Ordering::Acquire) >= MAX_IN_FLIGHT {
                tracing::warn!(%peer, "too many connections still silent: dropped");
                continue;
            }
            self.in_flight.fetch_add(1, Ordering::AcqRel);
            let greeter = Greeter {
                tls: self.tls.clone(),
                identity: self.identity.clone(),
                expected: self.expected,
                hello_timeout: self.hello_timeout,
                sender: self.sender.clone(),
                wake: self.wake.1.clone(),
                in_flight: self.in_flight.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name("greeter".into())
                .spawn(move || greeter.run(s, peer));
            if let Err(e) = spawned {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(%peer, "no thread to read the connection's first message: {e}");
            }
        }
    }
}

/// One connection's handshake and first message, in a thread of its own.
struct Greeter {
    tls: Option<TlsSetup>,
    identity: Option<String>,
    expected: &'static str,
    hello_timeout: Duration,
    sender: mpsc::Sender<Greeting>,
    wake: Arc<std::io::PipeWriter>,
    in_flight: Arc<AtomicUsize>,
}

impl Greeter {
    fn run(self, s: TcpStream, peer: SocketAddr) {
        match self.greet(s) {
            Ok((link, hello)) => {
                // The doorman may be gone (its caller gave up): then so is the link.
                let _ = self.sender.send(Greeting { link, hello, peer });
            }
            Err(e) => tracing::warn!(%peer, "no {} from the connection: {e}", self.expected),
        }
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        let _ = std::io::Write::write(&mut &*self.wake, &[1]);
    }

    fn greet(&self, s: TcpStream) -> Result<(Link, Message)> {
        s.set_nonblocking(false).map_err(io_err("socket"))?;
        s.set_read_timeout(Some(self.hello_timeout))
            .map_err(io_err("socket timeout"))?;
        // The handshake and the first message, however the peer paces them.
        let deadline = crate::deadline::Deadline::start(
            s.try_clone().map_err(io_err("socket"))?,
            self.hello_timeout,
        );
        let accepted = match (&self.tls, &self.identity) {
            (Some(t), Some(name)) => t.accept_named(s, name).map_err(Into::into),
            (tls, _) => precopy::accept(s, tls.as_ref()),
        };
        let greeted = accepted.and_then(|mut link| {
            let hello = wire::expect_control(&mut link, self.expected)?;
            Ok((link, hello))
        });
        let what = format!("the handshake and {}", self.expected);
        let (link, hello) = deadline.judge(&what, greeted)?;
        link.set_read_timeout(None)
            .map_err(io_err("socket timeout"))?;
        Ok((link, hello))
    }
}

/// Sends a `Refuse` without waiting: it fits any fresh socket's buffer, and
/// a peer that reads nothing holds up nobody.
fn refuse_without_waiting(s: TcpStream, reason: String) {
    if s.set_nonblocking(true).is_ok() {
        let _ = wire::write_control(&mut Link::plain(s), &Message::Refuse { reason });
    }
}

fn set_nonblocking(fd: RawFd) -> Result<()> {
    // SAFETY: fcntl on a descriptor we own, flags read before they are changed.
    let r = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
    };
    if r < 0 {
        return Err(io_err("wake-up pipe")(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A token naming one migration's extra connections: 64 random bits from
/// the kernel (`getrandom`), so that without TLS only a peer that saw the
/// migration's main link can present it.
pub(crate) fn token() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == b.len() as isize {
        return u64::from_ne_bytes(b);
    }
    // No getrandom (kernels before 3.17): the device.
    let mut f = std::fs::File::open("/dev/urandom");
    match f.as_mut().map(|f| std::io::Read::read_exact(f, &mut b)) {
        Ok(Ok(())) => u64::from_ne_bytes(b),
        _ => {
            tracing::warn!("no random source: the connection token is derived from the clock");
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ ((std::process::id() as u64) << 32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn tokens_are_random() {
        let t: std::collections::HashSet<u64> = (0..1000).map(|_| token()).collect();
        assert_eq!(t.len(), 1000);
        // Bits spread over the whole word, not a clock's low ones.
        let ors = t.iter().fold(0, |a, b| a | b);
        assert_eq!(ors, u64::MAX);
    }

    fn doorman() -> (Doorman, SocketAddr) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        let d = Doorman::new(
            l,
            Ipv4Addr::LOCALHOST.into(),
            None,
            "UrgentHello",
            Duration::from_secs(10),
        )
        .unwrap();
        (d, addr)
    }

    fn introduce(addr: SocketAddr, job: u64) -> TcpStream {
        let mut s = TcpStream::connect(addr).unwrap();
        wire::write_control(&mut s, &Message::UrgentHello { job }).unwrap();
        s
    }

    #[test]
    fn a_silent_stranger_holds_up_nobody() {
        let (mut d, addr) = doorman();
        let _silent = TcpStream::connect(addr).unwrap();
        let _ours = introduce(addr, 7);
        let t = Instant::now();
        match d.next(t + Duration::from_secs(10), None).unwrap() {
            Arrival::Greeted(g) => assert!(matches!(g.hello, Message::UrgentHello { job: 7 })),
            _ => panic!("the introduced connection was not reported"),
        }
        // The silent one would have held a sequential accept for its whole
        // 10 s read timeout.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn connections_from_another_address_are_dropped_unread() {
        let (mut d, addr) = doorman();
        let other = socket_from(Ipv4Addr::new(127, 0, 0, 2), addr);
        let mut other = other.expect("binding 127.0.0.2");
        wire::write_control(&mut other, &Message::UrgentHello { job: 1 }).unwrap();
        let end = Instant::now() + Duration::from_millis(300);
        assert!(matches!(d.next(end, None).unwrap(), Arrival::TimedOut));
        // The doorman closed it: the stranger reads end-of-stream.
        other
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 1];
        assert!(matches!(other.read(&mut buf), Ok(0) | Err(_)));
    }

    #[test]
    fn the_interrupt_descriptor_ends_the_wait() {
        let (mut d, _addr) = doorman();
        let (r, mut w) = std::io::pipe().unwrap();
        std::io::Write::write_all(&mut w, b"x").unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        assert!(matches!(
            d.next(end, Some(r.as_raw_fd())).unwrap(),
            Arrival::Interrupted
        ));
    }

    /// A connection to `to` from the local address `from`.
    fn socket_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
        // SAFETY: plain socket calls on a descriptor owned by the returned stream.
        unsafe {
            use std::os::fd::FromRawFd;
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let s = TcpStream::from_raw_fd(fd);
            let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(ip).to_be(),
                },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let a = sin(from, 0);
            if libc::bind(fd, &a as *const _ as *const libc::sockaddr, len) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let SocketAddr::V4(to) = to else {
                unreachable!("the test listens on IPv4")
            };
            let b = sin(*to.ip(), to.port());
            if libc::connect(fd, &b as *const _ as *const libc::sockaddr, len) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(s)
        }
    }
}
