//! A deadline for a whole exchange on a socket, where read timeouts bound
//! only each read: a peer that trickles its bytes in under every timeout
//! is cut off all the same.

use std::net::{Shutdown, TcpStream};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// Where a deadline is; it moves out of `Armed` once, under the lock, so
/// that a lift and the cut never both happen.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Armed,
    Lifted,
    Passed,
}

/// Shuts `socket` down (both ways) unless dropped within `limit`: what
/// blocks on it then fails at once.
pub struct Deadline {
    state: Arc<Mutex<State>>,
    /// Wakes the thread once lifted.
    cancel: Option<mpsc::Sender<()>>,
    limit: Duration,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Deadline {
    /// Starts the clock; `socket` is a handle of the connection to cut.
    pub fn start(socket: TcpStream, limit: Duration) -> Deadline {
        let (tx, rx) = mpsc::channel::<()>();
        let state = Arc::new(Mutex::new(State::Armed));
        let shared = state.clone();
        let spawned = std::thread::Builder::new()
            .name("deadline".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                    let mut s = lock(&shared);
                    // Lifted just now: the exchange made it in time.
                    if *s == State::Armed {
                        *s = State::Passed;
                        tracing::debug!(?limit, "deadline passed: connection cut");
                        let _ = socket.shutdown(Shutdown::Both);
                    }
                }
            });
        if let Err(e) = spawned {
            // Without the thread, the reads' own timeouts still apply.
            tracing::warn!("no deadline thread: {e}");
        }
        Deadline {
            state,
            cancel: Some(tx),
            limit,
        }
    }

    /// Lifts it: the connection is left alone from now on, unless it was
    /// cut already, which it returns (as [`Deadline::passed`] would).
    pub fn lift(&mut self) -> bool {
        let mut s = lock(&self.state);
        if *s == State::Armed {
            *s = State::Lifted;
        }
        let passed = *s == State::Passed;
        drop(s);
        self.cancel = None;
        passed
    }

    /// Lifts it and judges the exchange it guarded: where it passed, the
    /// connection was cut, however `done` came out (an exchange that made it
    /// just as the cut came would go on over a dead socket), so the error
    /// names the deadline and `what` missed it.
    pub fn judge<T>(mut self, what: &str, done: crate::Result<T>) -> crate::Result<T> {
        if self.lift() {
            return Err(crate::Error::Io {
                context: format!("{what} not done within {:?}", self.limit),
                cause: std::io::ErrorKind::TimedOut.into(),
            });
        }
        done
    }

    /// Whether it passed (and the connection was cut).
    pub fn passed(&self) -> bool {
        *lock(&self.state) == State::Passed
    }

    /// The time it allowed.
    pub fn limit(&self) -> Duration {
        self.limit
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let _ = self.lift();
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

    #[test]
    fn an_exchange_judged_after_the_cut_fails_naming_the_deadline() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        // The exchange "made it", but only after the cut.
        let late = Deadline::start(s.try_clone().unwrap(), Duration::from_millis(10));
        std::thread::sleep(Duration::from_millis(200));
        let e = late.judge("the greeting", Ok(())).unwrap_err();
        assert!(
            e.to_string().contains("the greeting not done within 10ms"),
            "{e}"
        );
        // In time: what the exchange gave, error or not, and the socket stays.
        let quick = Deadline::start(s.try_clone().unwrap(), Duration::from_secs(60));
        assert_eq!(quick.judge("the greeting", Ok(7)).unwrap(), 7);
        let quick = Deadline::start(s.try_clone().unwrap(), Duration::from_secs(60));
        let e = quick
            .judge::<()>("the greeting", Err(crate::Error::Protocol("bad".into())))
            .unwrap_err();
        assert!(matches!(e, crate::Error::Protocol(_)), "{e}");
    }
}
