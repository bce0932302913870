//! Client of the migd control socket: JSON lines, one request line, one reply line.

use std::fmt;
use std::io::{self, BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/migd/migd.sock";

/// Longest request line the daemon accepts, newline included.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What can go wrong talking to the daemon.
#[derive(Debug)]
pub enum Error {
    /// The socket could not be reached.
    Connect { path: PathBuf, source: io::Error },
    /// Reading or writing failed after connecting.
    Io(io::Error),
    /// The daemon did not take the request, or did not reply, within the timeout.
    Timeout(Duration),
    /// The daemon's reply was not a JSON object.
    BadReply(String),
    /// The daemon answered `{"ok":false,"error":...}`.
    Daemon(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect { path, source } => write!(
                f,
                "cannot connect to migd at {}: {source} (is migd running? see --socket)",
                path.display()
            ),
            Error::Io(e) => write!(f, "talking to migd: {e}"),
            Error::Timeout(t) => {
                let within = match t.as_secs() {
                    0 => format!("{} ms", t.as_millis()),
                    s => format!("{s} s"),
                };
                write!(
                    f,
                    "migd did not reply within {within}; the request may still be running \
                     in the daemon (see `migctl jobs` or `migctl info NAME`)"
                )
            }
            Error::BadReply(r) => write!(f, "migd sent a reply that is not JSON: {r}"),
            Error::Daemon(e) => f.write_str(e),
        }
    }
}

/// No source: the message already says the cause, and an error chain printed
/// whole (migctl's `{:#}`) would say it twice ("...: No such file or directory
/// (os error 2) (is migd running? see --socket): No such file or directory").
impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// A connection to the daemon; several requests may be sent on it in turn. After a
/// failed exchange (an I/O error, a timeout, a reply that is not JSON) the connection
/// is dropped and the next request opens a new one, so a late reply to the failed
/// request is never read as the next one's.
pub struct Client {
    path: PathBuf,
    timeout: Duration,
    conn: Option<Conn>,
}

struct Conn {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Conn {
    fn open(path: &Path, timeout: Duration) -> Result<Conn, Error> {
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Conn { stream, reader })
    }

    fn exchange(&mut self, line: &[u8], timeout: Duration) -> Result<Value, Error> {
        // A socket timeout reads as WouldBlock (EAGAIN) or TimedOut.
        let io = |e: io::Error| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout(timeout),
            _ => Error::Io(e),
        };
        send_all(&self.stream, line).map_err(io)?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply).map_err(io)? == 0 {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "migd closed the connection without a reply",
            )));
        }
        match serde_json::from_str::<Value>(&reply) {
            Ok(v) if v.is_object() => Ok(v),
            _ => Err(Error::BadReply(reply.trim_end().to_string())),
        }
    }
}

impl Client {
    /// Connects to the daemon's socket. Replies are awaited for at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, Error> {
        let conn = Conn::open(path, timeout)?;
        Ok(Client {
            path: path.to_path_buf(),
            timeout,
            conn: Some(conn),
        })
    }

    /// Sends one request and returns the reply as it came, `ok:false` included.
    /// Connects again first if the previous exchange failed.
    pub fn request(&mut self, req: &Value) -> Result<Value, Error> {
        let mut line = serde_json::to_vec(req).map_err(|e| Error::BadReply(e.to_string()))?;
        line.push(b'\n');
        let conn = match &mut self.conn {
            Some(c) => c,
            None => self.conn.insert(Conn::open(&self.path, self.timeout)?),
        };
        let reply = conn.exchange(&line, self.timeout);
        if reply.is_err() {
            self.conn = None;
        }
        reply
    }

    /// Sends one request; an `{"ok":false}` reply becomes [`Error::Daemon`].
    pub fn call(&mut self, req: &Value) -> Result<Value, Error> {
        let reply = self.request(req)?;
        if reply.get("ok").and_then(Value::as_bool) == Some(true) {
            Ok(reply)
        } else {
            let msg = reply
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("request failed (no error message)");
            Err(Error::Daemon(msg.to_string()))
        }
    }
}

/// Connects, sends one request and returns the checked reply.
pub fn call(path: &Path, req: &Value, timeout: Duration) -> Result<Value, Error> {
    Client::connect(path, timeout)?.call(req)
}

/// Writes all of `buf` with `MSG_NOSIGNAL`: a daemon that closed the
/// connection is an error (EPIPE) to act on, never a SIGPIPE, whatever the
/// process's disposition of the signal (migctl restores its default action,
/// so that `| head` ends it quietly) and whatever the toolchain's std does.
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    while !buf.is_empty() {
        // SAFETY: send on a descriptor the stream owns, from a live slice
        // whose length is passed with it.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    /// Answers each connection's requests in turn: the first request of the
    /// first connection after `late`, every other at once, with its `n`.
    fn fake_daemon(tag: &str, late: Duration) -> PathBuf {
        let path = std::env::temp_dir().join(format!("migd-client-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for (i, s) in listener.incoming().enumerate() {
                let Ok(s) = s else { return };
                std::thread::spawn(move || {
                    let mut w = s.try_clone().unwrap();
                    for (j, line) in BufReader::new(s).lines().enumerate() {
                        let Ok(line) = line else { return };
                        let req: Value = serde_json::from_str(&line).unwrap();
                        if i == 0 && j == 0 {
                            std::thread::sleep(late);
                        }
                        let reply = json!({"ok": true, "n": req["n"]});
                        if writeln!(w, "{reply}").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        path
    }

    #[test]
    fn a_timeout_says_so_and_the_late_reply_is_not_read_as_the_next() {
        let path = fake_daemon("late", Duration::from_millis(600));
        let mut c = Client::connect(&path, Duration::from_millis(200)).unwrap();
        let e = c.call(&json!({"cmd": "job", "n": 1})).unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("did not reply within 200 ms") && msg.contains("may still be running"),
            "{msg}"
        );
        // The late reply to 1 comes on the old connection, which is gone.
        std::thread::sleep(Duration::from_millis(600));
        for n in 2..5 {
            assert_eq!(c.call(&json!({"cmd": "job", "n": n})).unwrap()["n"], n);
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_connect_error_says_its_cause_once() {
        let path = std::env::temp_dir().join(format!("migd-client-none-{}", std::process::id()));
        let e = Client::connect(&path, Duration::from_secs(1))
            .err()
            .unwrap();
        let msg = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(msg.matches("No such file or directory").count(), 1, "{msg}");
        assert!(msg.ends_with("(is migd running? see --socket)"), "{msg}");
        let msg = format!(
            "{:#}",
            anyhow::Error::from(Error::from(io::Error::from(io::ErrorKind::BrokenPipe)))
        );
        assert_eq!(msg, "talking to migd: broken pipe", "{msg}");
    }

    #[test]
    fn a_client_whose_daemon_is_gone_says_so_on_each_request() {
        let path = fake_daemon("gone", Duration::ZERO);
        let mut c = Client::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(c.call(&json!({"n": 1})).unwrap()["n"], 1);
        std::fs::remove_file(&path).unwrap();
        // A connection dropped after a failure is opened again for the next
        // request: with the socket gone, each says it cannot connect.
        c.conn = None;
        for _ in 0..2 {
            let e = c.call(&json!({"n": 2})).unwrap_err();
            assert!(matches!(e, Error::Connect { .. }), "{e:?}");
        }
    }
}
