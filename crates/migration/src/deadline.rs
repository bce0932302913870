//! A deadline for a whole exchange on a socket, where read timeouts bound
//! only each read: a peer that trickles its bytes in under every timeout
//! is cut off all the same.

use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

/// Shuts `socket` down (both ways) unless dropped within `limit`: what
/// blocks on it then fails at once.
pub struct Deadline {
    cancel: Option<mpsc::Sender<()>>,
    passed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    limit: Duration,
}

impl Deadline {
    /// Starts the clock; `socket` is a handle of the connection to cut.
    pub fn start(socket: TcpStream, limit: Duration) -> Deadline {
        let (tx, rx) = mpsc::channel::<()>();
        let passed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = passed.clone();
        let spawned = std::thread::Builder::new()
            .name("deadline".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                    tracing::debug!(?limit, "deadline passed: connection cut");
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    let _ = socket.shutdown(Shutdown::Both);
                }
            });
        if let Err(e) = spawned {
            // Without the thread, the reads' own timeouts still apply.
            tracing::warn!("no deadline thread: {e}");
        }
        Deadline {
            cancel: Some(tx),
            passed,
            limit,
        }
    }

    /// Lifts it: the connection is left alone from now on (unless it was
    /// cut already).
    pub fn lift(&mut self) {
        self.cancel = None;
    }

    /// Whether it passed (and the connection was cut).
    pub fn passed(&self) -> bool {
        self.passed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The time it allowed.
    pub fn limit(&self) -> Duration {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Instant;

    #[test]
    fn a_trickling_peer_is_cut_off_and_a_quick_one_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            // A byte every 50 ms, each well inside the reads' timeout.
            for _ in 0..100 {
                if c.write_all(&[1]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let t = Instant::now();
        let d = Deadline::start(s.try_clone().unwrap(), Duration::from_millis(300));
        let mut buf = [0u8; 100];
        let e = s.read_exact(&mut buf);
        assert!(e.is_err(), "read all 100 bytes");
        assert!(d.passed());
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        drop(d);
        peer.join().unwrap();
        // Lifted, or dropped, in time: the connection is left alone.
        let (s2, _) = {
            let _c = TcpStream::connect(addr).unwrap();
            l.accept().unwrap()
        };
        let mut lifted = Deadline::start(s2.try_clone().unwrap(), Duration::from_millis(50));
        lifted.lift();
        std::thread::sleep(Duration::from_millis(150));
        assert!(!lifted.passed());
        let c = TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        drop(Deadline::start(
            s.try_clone().unwrap(),
            Duration::from_millis(50),
        ));
        std::thread::sleep(Duration::from_millis(150));
        (&c).write_all(&[7]).unwrap();
        let mut one = [0u8; 1];
        (&s).read_exact(&mut one).unwrap();
        assert_eq!(one, [7]);
    }
}
