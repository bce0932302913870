//! A TCP relay that holds every byte for a fixed time each way: a long link
//! (a WAN's round trip) on loopback, where netem is not available.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Listens on a loopback port and relays each connection to `to`, every
/// chunk delivered `one_way` after it was read. Threads end with the
/// connections they serve.
pub struct DelayRelay {
    /// The port to connect to instead of `to`.
    pub port: u16,
}

impl DelayRelay {
    pub fn start(to: std::net::SocketAddr, one_way: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(to) else {
                    continue;
                };
                for s in [&client, &server] {
                    s.set_nodelay(true).unwrap();
                }
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                pump(client, server, one_way);
                pump(s2, c2, one_way);
            }
        });
        DelayRelay { port }
    }
}

/// Copies `from` into `to`, each chunk `delay` late; then half-closes `to`.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0
                || tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, chunk) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
