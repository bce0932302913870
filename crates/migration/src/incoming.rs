//! Destination side: receives pages into a fresh memfd, then the state,
//! rebuilds the VM paused, answers Ready, and resumes only on Go.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Instant;

use vmm::memory::PAGE_SIZE;
use vmm::{GuestRam, Vm, VmState};
use wire::{Message, KIND_CONTROL};

use crate::memview::MemView;
use crate::{io_err, Error, Result};

/// What the destination measured.
#[derive(Clone, Debug, Default)]
pub struct IncomingStats {
    /// Pages received.
    pub pages: u64,
    /// Bytes received (payload).
    pub bytes: u64,
    /// Rounds seen.
    pub rounds: u32,
    /// Go → vCPUs running, µs.
    pub resume_us: u64,
    /// Verify mode: the memory digest matched.
    pub verified: bool,
}

/// Receives a VM of `memory` bytes over `stream` (after the handshake) and runs it.
pub fn receive(
    stream: TcpStream,
    memory: u64,
    vcpus: usize,
    console: Option<&Path>,
) -> Result<(Vm, IncomingStats)> {
    // A source that stalls for a minute is gone: give up rather than hang.
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .map_err(io_err("socket timeout"))?;
    // Ready and Confirm are small and on the downtime's critical path: no Nagle.
    stream.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
    let mut out = stream.try_clone().map_err(io_err("socket"))?;
    let mut r = BufReader::with_capacity(4 << 20, stream);
    // Build the VM now, so that only loading the state remains for the downtime.
    let prepared = Vm::prepare(GuestRam::new(memory)?, vcpus, console)?;
    let mem = MemView::new(prepared.ram());
    wire::write_control(&mut out, &Message::Prepared)?;
    let mut stats = IncomingStats::default();
    let mut expected_digest = None;
    let state = loop {
        let h = wire::read_header(&mut r)?;
        tracing::trace!(kind = h.kind, len = h.body_len, "frame");
        if h.kind != KIND_CONTROL {
            let offsets = wire::read_batch_offsets(&mut r, h.body_len)?;
            for off in offsets {
                let page = mem.page_mut(off).ok_or_else(|| {
                    Error::Protocol(format!(
                        "page offset {off:#x} outside the guest's {memory} bytes"
                    ))
                })?;
                r.read_exact(page).map_err(wire::WireError::from)?;
                stats.pages += 1;
                stats.bytes += PAGE_SIZE;
            }
            continue;
        }
        match wire::read_control_body(&mut r, h.body_len)? {
            Message::Zero { ranges } => {
                for (off, n) in ranges {
                    for i in 0..n {
                        let page = mem.page_mut(off + i * PAGE_SIZE).ok_or_else(|| {
                            Error::Protocol(format!("zero range {off:#x}+{n} outside RAM"))
                        })?;
                        page.fill(0);
                    }
                }
            }
            Message::RoundEnd { round } => stats.rounds = round + 1,
            Message::State { blob } => {
                let t = Instant::now();
                let state = VmState::decode(&blob)?;
                tracing::debug!(
                    us = t.elapsed().as_micros() as u64,
                    bytes = blob.len(),
                    "state decoded"
                );
                break state;
            }
            Message::Digest { crc32 } => expected_digest = Some(crc32),
            Message::Cancel { reason } => return Err(Error::PeerCancelled(reason)),
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {} during the transfer",
                    other.name()
                )))
            }
        }
    };
    let t = Instant::now();
    let vm = prepared.load(&state)?;
    tracing::debug!(us = t.elapsed().as_micros() as u64, "state loaded");
    if let Some(crc32) = expected_digest {
        let ours = mem.digest();
        if ours != crc32 {
            let reason =
                format!("memory digest mismatch: source {crc32:#010x}, destination {ours:#010x}");
            let _ = wire::write_control(
                &mut out,
                &Message::Cancel {
                    reason: reason.clone(),
                },
            );
            return Err(Error::Protocol(reason));
        }
        stats.verified = true;
        tracing::info!(crc32, "memory digest matches the source");
    }
    drop(mem);
    wire::write_control(&mut out, &Message::Ready)?;
    match wire::expect_control(&mut r, "Go")? {
        Message::Go => {}
        Message::Cancel { reason } => return Err(Error::PeerCancelled(reason)),
        other => {
            return Err(Error::Protocol(format!(
                "expected Go, got {}",
                other.name()
            )))
        }
    }
    let t = Instant::now();
    vm.resume();
    stats.resume_us = t.elapsed().as_micros() as u64;
    wire::write_control(
        &mut out,
        &Message::Confirm {
            resume_us: stats.resume_us,
        },
    )?;
    let _ = out.flush();
    Ok((vm, stats))
}
