//! Measures this machine's physical limits, for the benchmark tables:
//! memcpy bandwidth, loopback TCP throughput (from and to buffers in the
//! CPU's caches, and from and to memory), and our zero-page scan speed.
//! Prints one JSON object. Run: `cargo run --release -p migration --example limits`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

const SIZE: usize = 1 << 30;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn memcpy_gbps() -> f64 {
    let src = vec![1u8; SIZE];
    let mut dst = vec![0u8; SIZE];
    dst.copy_from_slice(&src); // fault everything in first
    median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                dst.copy_from_slice(&src);
                std::hint::black_box(&dst);
                SIZE as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .collect(),
    )
}

fn zero_scan_gbps() -> f64 {
    let mut buf = vec![0u8; SIZE];
    for p in buf.chunks_mut(4096) {
        p[0] = 0; // touch: real pages, not the shared zero page
    }
    median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                let zeros = buf
                    .chunks(4096)
                    .filter(|p| vmm::memory::is_zero_page(p))
                    .count();
                assert_eq!(zeros, SIZE / 4096);
                SIZE as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .collect(),
    )
}

const TCP_TOTAL: usize = 4 << 30;

/// Accepts one connection on `l` and reads it to the end (or `TCP_TOTAL`).
fn sink(l: TcpListener) -> std::io::Result<()> {
    let (mut s, _) = l.accept()?;
    let mut buf = vec![0u8; 4 << 20];
    let mut got = 0;
    while got < TCP_TOTAL {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(())
}

/// Sends `TCP_TOTAL` bytes to `addr`: Gbit/s until the last write returns.
fn send_gbit(addr: std::net::SocketAddr) -> std::io::Result<f64> {
    let mut s = TcpStream::connect(addr)?;
    let buf = vec![7u8; 4 << 20];
    let t = Instant::now();
    let mut sent = 0;
    while sent < TCP_TOTAL {
        s.write_all(&buf)?;
        sent += buf.len();
    }
    drop(s);
    Ok(TCP_TOTAL as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9)
}

fn loopback_gbit() -> std::io::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rx = std::thread::spawn(move || sink(l));
    let gbit = send_gbit(addr)?;
    rx.join()
        .map_err(|_| std::io::Error::other("receiver panicked"))??;
    Ok(gbit)
}

/// Bytes [`loopback_mem_gbit`] moves: about what a 256 MiB working set is.
const MEM_TOTAL: usize = 256 << 20;

/// Loopback TCP from memory to memory: `MEM_TOTAL` bytes of non-zero data,
/// written straight out of a buffer of that size, read straight into
/// another (both touched first), one stream. What moving guest memory
/// between two processes costs at least: unlike [`loopback_gbit`], whose
/// 4 MiB buffers stay in the CPU's caches, every byte comes from and goes
/// to DRAM. Gbit/s until the receiver has the last byte.
fn loopback_mem_gbit() -> std::io::Result<f64> {
    let src: Vec<u8> = (0..MEM_TOTAL)
        .map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes()[7])
        .collect();
    let mut dst = vec![1u8; MEM_TOTAL];
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let t = Instant::now();
    let rx = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let (mut s, _) = l.accept()?;
        let mut got = 0;
        while got < MEM_TOTAL {
            let n = s.read(&mut dst[got..])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
        }
        Ok(dst)
    });
    let mut s = TcpStream::connect(addr)?;
    for chunk in src.chunks(4 << 20) {
        s.write_all(chunk)?;
    }
    let dst = rx
        .join()
        .map_err(|_| std::io::Error::other("receiver panicked"))??;
    let gbit = MEM_TOTAL as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9;
    assert!(dst == src, "the bytes did not arrive intact");
    Ok(gbit)
}

fn main() {
    // Over another path (e.g. between two network namespaces): `limits
    // tcp-sink ADDR:PORT` takes one connection (three, one per measurement);
    // `limits tcp-send ADDR:PORT` prints the median Gbit/s of three.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, addr] = &args[..] {
        let addr: std::net::SocketAddr = addr.parse().expect("ADDR:PORT");
        match mode.as_str() {
            "tcp-sink" => {
                let l = TcpListener::bind(addr).expect("bind");
                println!("listening");
                for _ in 0..3 {
                    let l = l.try_clone().expect("listener");
                    sink(l).expect("receive");
                }
            }
            "tcp-send" => {
                let g = median((0..3).map(|_| send_gbit(addr).unwrap_or(0.0)).collect());
                println!("{{\"tcp_gbit_per_s\": {g:.2}}}");
            }
            _ => panic!("usage: limits [tcp-sink|tcp-send ADDR:PORT]"),
        }
        return;
    }
    let tcp = median((0..3).map(|_| loopback_gbit().unwrap_or(0.0)).collect());
    let tcp_mem = median((0..3).map(|_| loopback_mem_gbit().unwrap_or(0.0)).collect());
    println!(
        "{{\"memcpy_gbytes_per_s\": {:.2}, \"zero_scan_gbytes_per_s\": {:.2}, \"loopback_tcp_gbit_per_s\": {:.2}, \"loopback_tcp_mem_gbit_per_s\": {:.2}}}",
        memcpy_gbps(),
        zero_scan_gbps(),
        tcp,
        tcp_mem
    );
}
