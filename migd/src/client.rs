//! Client of the migd control socket: JSON lines, one request line, one reply line.

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
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
            Error::BadReply(r) => write!(f, "migd sent a reply that is not JSON: {r}"),
            Error::Daemon(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. } => Some(source),
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// One connection to the daemon; several requests may be sent on it in turn.
pub struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the daemon's socket. Replies are awaited for at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, Error> {
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Client { stream, reader })
    }

    /// Sends one request and returns the reply as it came, `ok:false` included.
    pub fn request(&mut self, req: &Value) -> Result<Value, Error> {
        let mut line = serde_json::to_vec(req).map_err(|e| Error::BadReply(e.to_string()))?;
        line.push(b'\n');
        self.stream.write_all(&line)?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
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
