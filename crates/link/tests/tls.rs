//! TLS links over loopback with certificates made by scripts/make-certs.sh:
//! mutual authentication, the peer check, and the bad cases of issue #6.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use link::{Link, LinkError, TlsFiles, TlsSetup};

/// One CA with hosts a, b, c (c is nobody's peer) and an expired one; a second CA.
fn certs() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Under the build's own scratch directory, not /tmp: a static is
        // never dropped, so what it names outlives the run.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("link-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-certs.sh");
        let run = |args: &[&str]| {
            let out = Command::new("bash")
                .arg(&script)
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let d = dir.to_str().unwrap();
        run(&[
            d,
            "host-a=127.0.0.1",
            "host-b=127.0.0.1",
            "host-c=127.0.0.1",
        ]);
        run(&[d, "--expired", "host-old=127.0.0.1"]);
        run(&[&format!("{d}/other"), "host-a=127.0.0.1"]);
        dir
    })
}

fn setup(host: &str, ca_dir: &str, peers: &[&str]) -> TlsSetup {
    let dir = certs().join(ca_dir);
    TlsSetup::load(&TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{host}.pem")),
        key: dir.join(format!("{host}.key")),
        peers: peers.iter().map(|p| p.to_string()).collect(),
    })
    .unwrap()
}

/// `client` connects to a listener whose accepted sockets go through `server`.
fn pair(
    client: impl FnOnce(TcpStream) -> Result<Link, LinkError>,
    server: impl FnOnce(TcpStream) -> Result<Link, LinkError> + Send + 'static,
) -> (Result<Link, LinkError>, Result<Link, LinkError>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || server(l.accept().unwrap().0));
    let c = client(TcpStream::connect(addr).unwrap());
    (c, t.join().unwrap())
}

#[test]
fn mutual_tls_carries_data_both_ways_and_across_processes() {
    let (a, b) = (
        setup("host-a", "", &["host-b"]),
        setup("host-b", "", &["host-a"]),
    );
    let (c, s) = pair(move |t| a.connect(t, "127.0.0.1"), move |t| b.accept(t));
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert!(c.is_secure() && s.is_secure());
    assert_eq!(s.peer_identity(), Some("host-a"));
    assert_eq!(c.peer_identity(), Some("127.0.0.1"));
    // Both directions at once, from clones (a reader and a writer thread each).
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut cw = c.try_clone().unwrap();
    let b2 = big.clone();
    let w = std::thread::spawn(move || cw.write_all(&b2).unwrap());
    let mut sw = s.try_clone().unwrap();
    let b3 = big.clone();
    let w2 = std::thread::spawn(move || sw.write_all(&b3).unwrap());
    let mut got = vec![0u8; big.len()];
    s.read_exact(&mut got).unwrap();
    assert!(got == big);
    c.read_exact(&mut got).unwrap();
    assert!(got == big);
    w.join().unwrap();
    w2.join().unwrap();
    // Hand the server side to "another process": export, import on a new fd.
    c.write_all(b"after the hand-off").unwrap();
    let state = s.export().unwrap().expect("a TLS link exports its state");
    let mut s2 = Link::import(s.tcp().try_clone().unwrap(), Some(&state)).unwrap();
    drop(s);
    let mut buf = [0u8; 18];
    s2.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after the hand-off");
    s2.write_all(b"ok").unwrap();
    let mut buf = [0u8; 2];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ok");
}

fn err(r: Result<Link, LinkError>) -> String {
    match r {
        Ok(_) => panic!("the link was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn untrusted_expired_and_unlisted_certificates_are_refused_with_the_reason() {
    let b = setup("host-b", "", &["host-a"]);
    // A certificate from another CA.
    let stranger = setup("host-a", "other", &["host-b"]);
    let b1 = b.clone();
    let (c, s) = pair(
        move |t| stranger.connect(t, "127.0.0.1"),
        move |t| b1.accept(t),
    );
    let (c, s) = (err(c), err(s));
    assert!(
        c.contains("UnknownIssuer") || c.contains("issuer"),
        "client: {c}"
    );
    assert!(s.contains("UnknownCA"), "server: {s}");
    // Our CA trusted, but a certificate from another: in TLS 1.3 the client
    // learns it was rejected on its first read, with the server's alert.
    let mixed = TlsSetup::load(&TlsFiles {
        ca: certs().join("ca.pem"),
        cert: certs().join("other/host-a.pem"),
        key: certs().join("other/host-a.key"),
        peers: vec!["host-b".into()],
    })
    .unwrap();
    let b1 = b.clone();
    let (c, s) = pair(
        move |t| mixed.connect(t, "127.0.0.1"),
        move |t| b1.accept(t),
    );
    let s = err(s);
    assert!(s.contains("UnknownIssuer"), "server: {s}");
    let mut c = c.unwrap();
    let mut buf = [0u8; 1];
    let e = c.read(&mut buf).unwrap_err().to_string();
    assert!(
        e.contains("not from the peer's CA") || e.contains("rejected"),
        "client: {e}"
    );
    // An expired certificate.
    let old = setup("host-old", "", &["host-b"]);
    let b1 = b.clone();
    let (_, s) = pair(move |t| old.connect(t, "127.0.0.1"), move |t| b1.accept(t));
    let s = err(s);
    assert!(
        s.contains("Expired") || s.contains("expired"),
        "server: {s}"
    );
    // Signed by our CA but not a configured peer.
    let c3 = setup("host-c", "", &["host-b"]);
    let b1 = b.clone();
    let (_, s) = pair(move |t| c3.connect(t, "127.0.0.1"), move |t| b1.accept(t));
    let s = err(s);
    assert!(
        s.contains("not for any configured peer (host-a)"),
        "server: {s}"
    );
    // The destination's certificate does not cover the name that was dialled.
    let a = setup("host-a", "", &["host-b"]);
    let b1 = b.clone();
    let (c, _) = pair(move |t| a.connect(t, "host-z"), move |t| b1.accept(t));
    let c = err(c);
    assert!(
        c.contains("NotValidForName") || c.contains("name"),
        "client: {c}"
    );
}

#[test]
fn plaintext_and_tls_peers_on_the_wrong_port_are_named() {
    let b = setup("host-b", "", &["host-a"]);
    // A plaintext client on a TLS port.
    let (_, s) = pair(
        |mut t| {
            t.write_all(b"\x40\x00\x00\x00\x00migd plaintext hello")
                .unwrap();
            Ok(Link::plain(t))
        },
        move |t| b.accept(t),
    );
    let s = err(s);
    assert!(s.contains("speaks plaintext"), "server: {s}");
    // A TLS client on a plaintext port: the server sees a TLS hello and closes.
    let a = setup("host-a", "", &["host-b"]);
    let (c, s) = pair(
        move |t| a.connect(t, "127.0.0.1"),
        |t| {
            assert!(link::looks_like_tls(&t).unwrap());
            let mut t = t;
            let _ = t.write_all(b"\x20\x00\x00\x00\x00refused in plaintext");
            Ok(Link::plain(t))
        },
    );
    let c = err(c);
    assert!(
        c.contains("plaintext") || c.contains("closed"),
        "client: {c}"
    );
    assert!(s.is_ok());
}

#[test]
fn bad_configuration_names_the_file() {
    let dir = certs();
    let e = TlsSetup::load(&TlsFiles {
        ca: dir.join("missing.pem"),
        cert: dir.join("host-a.pem"),
        key: dir.join("host-a.key"),
        peers: vec!["host-b".into()],
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("missing.pem"), "{e}");
    let e = TlsSetup::load(&TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("host-a.pem"),
        key: dir.join("host-b.key"),
        peers: vec!["host-b".into()],
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("certificate and key"), "{e}");
    let e = TlsSetup::load(&TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("host-a.pem"),
        key: dir.join("host-a.key"),
        peers: vec![],
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("no peers"), "{e}");
}

/// A peer that trickles its handshake, each byte well within a read's
/// timeout, is cut off at the handshake's limit in all, on either side:
/// before, each read had the limit, and a record of 16 KiB a byte every few
/// seconds held the handshake (and the migration thread) for hours.
#[test]
fn a_trickled_handshake_is_cut_off_at_its_limit() {
    use std::time::{Duration, Instant};
    let trickle = |mut s: TcpStream| {
        std::thread::spawn(move || {
            // A handshake record that claims 16 KiB, then a byte at a time.
            let _ = s.write_all(&[0x16, 0x03, 0x03, 0x40, 0x00]);
            for _ in 0..100 {
                std::thread::sleep(Duration::from_millis(200));
                if s.write_all(&[0]).is_err() {
                    return;
                }
            }
        })
    };
    let limit = Duration::from_secs(1);
    // The client's side: the server trickles.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || trickle(l.accept().unwrap().0));
    let a = setup("host-a", "", &["host-b"]).with_handshake_timeout(limit);
    let t = Instant::now();
    let Err(e) = a.connect(TcpStream::connect(addr).unwrap(), "127.0.0.1") else {
        panic!("a trickled handshake succeeded");
    };
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "{:?}: {e}",
        t.elapsed()
    );
    assert!(e.to_string().contains("not done within 1s"), "{e}");
    drop(server);
    // The server's side: the client trickles.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let client = trickle(TcpStream::connect(addr).unwrap());
    let b = setup("host-b", "", &["host-a"]).with_handshake_timeout(limit);
    let t = Instant::now();
    let Err(e) = b.accept(l.accept().unwrap().0) else {
        panic!("a trickled handshake succeeded");
    };
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "{:?}: {e}",
        t.elapsed()
    );
    drop(client);
    // The wait for the first bytes counts too: a client silent for 1.5 s,
    // then trickling, is cut at the 1 s limit, not 1 s after it spoke.
    let late = std::thread::spawn(move || {
        let s = TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let _ = trickle(s).join();
    });
    let t = Instant::now();
    let Err(e) = b.accept(l.accept().unwrap().0) else {
        panic!("a late, trickled handshake succeeded");
    };
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "{:?}: {e}",
        t.elapsed()
    );
    drop(late);
}

/// A connection within a migration must come from the host its main link
/// authenticated: another configured peer (behind the same address here)
/// is refused, naming who was expected; the same host is let in.
#[test]
fn a_connection_within_a_migration_must_prove_the_main_links_name() {
    let server = setup("host-b", "", &["host-a", "host-c"]);
    let s2 = server.clone();
    let c = setup("host-c", "", &["host-b"]);
    let (_, s) = pair(
        move |t| c.connect(t, "127.0.0.1"),
        move |t| s2.accept_named(t, "host-a"),
    );
    let e = err(s);
    assert!(e.contains("host-a"), "{e}");
    // Any configured peer passes a plain accept.
    let c = setup("host-c", "", &["host-b"]);
    let s2 = server.clone();
    let (_, s) = pair(move |t| c.connect(t, "127.0.0.1"), move |t| s2.accept(t));
    assert_eq!(s.unwrap().peer_identity(), Some("host-c"));
    // The main link's host, by the name it was matched or dialed as.
    for name in ["host-a", "127.0.0.1"] {
        let a = setup("host-a", "", &["host-b"]);
        let s2 = server.clone();
        let (c, s) = pair(
            move |t| a.connect(t, "127.0.0.1"),
            move |t| s2.accept_named(t, name),
        );
        assert!(c.is_ok(), "{name}");
        assert_eq!(s.unwrap().peer_identity(), Some(name));
    }
}
