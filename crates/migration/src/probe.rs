//! Measuring the path to a destination for the cost model: round-trip time and
//! bandwidth, with a `probe` Hello that the destination daemon accepts and
//! answers without creating anything.
//!
//! Exchange: Hello{mode: "probe"} → Accept; `n` page batches of junk; Go →
//! Confirm. RTT is the best of the Hello/Accept exchange and the Go/Confirm
//! exchange; bandwidth is the bytes over the time from the first batch to Confirm.

use link::{Link, TlsSetup};
use std::io::Write;
use std::time::{Duration, Instant};

use wire::{Message, MAX_BATCH_PAGES, PAGE_SIZE};

use crate::{handshake, io_err, Error, Result};

/// What a probe measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PathStats {
    /// Round-trip time, seconds.
    pub rtt: f64,
    /// Throughput of page batches, bytes/s.
    pub bandwidth: f64,
}

/// Name of the probe mode in the Hello.
pub const PROBE_MODE: &str = "probe";

/// Probes `to` with `bytes` of page data (rounded up to whole batches).
pub fn probe(to: &str, bytes: u64, tls: Option<&TlsSetup>) -> Result<PathStats> {
    let mut stream = crate::precopy::connect(to, tls)?;
    stream.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err("socket timeout"))?;
    let vm = wire::VmDescriptor {
        name: String::new(),
        memory: 0,
        vcpus: 0,
        cpu_vendor: String::new(),
        cpu_features: Vec::new(),
    };
    let t = Instant::now();
    handshake::hello(&mut stream, PROBE_MODE, vm)?;
    let rtt_hello = t.elapsed().as_secs_f64();
    let junk = vec![0x5au8; PAGE_SIZE];
    let pages: Vec<&[u8]> = (0..MAX_BATCH_PAGES).map(|_| &junk[..]).collect();
    let offsets: Vec<u64> = (0..MAX_BATCH_PAGES as u64)
        .map(|p| p * PAGE_SIZE as u64)
        .collect();
    let batch_bytes = (MAX_BATCH_PAGES * PAGE_SIZE) as u64;
    let batches = bytes.div_ceil(batch_bytes).max(1);
    let t = Instant::now();
    for _ in 0..batches {
        wire::write_pages(&mut stream, &offsets, &pages)?;
    }
    let t_go = Instant::now();
    wire::write_control(&mut stream, &Message::Go)?;
    stream.flush().map_err(io_err("probe"))?;
    match wire::expect_control(&mut stream, "Confirm")? {
        Message::Confirm { .. } => {}
        other => {
            return Err(Error::Protocol(format!(
                "probe: expected Confirm, got {}",
                other.name()
            )))
        }
    }
    let total = t.elapsed().as_secs_f64();
    let rtt = rtt_hello.min(t_go.elapsed().as_secs_f64());
    Ok(PathStats {
        rtt,
        bandwidth: (batches * batch_bytes) as f64 / total.max(1e-9),
    })
}

/// Destination side, after `Accept`: discards page batches until Go, answers Confirm.
pub fn serve(stream: &mut Link) -> Result<()> {
    loop {
        match wire::read_frame(stream)? {
            wire::Frame::Pages { .. } => {}
            wire::Frame::Control(Message::Go) => {
                wire::write_control(stream, &Message::Confirm { resume_us: 0 })?;
                return Ok(());
            }
            wire::Frame::Control(other) => {
                return Err(Error::Protocol(format!(
                    "probe: unexpected {}",
                    other.name()
                )))
            }
        }
    }
}
