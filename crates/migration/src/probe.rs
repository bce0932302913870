//! Measuring what the cost model needs: the path to a destination (round-trip
//! time and bandwidth, with a `probe` Hello that the destination daemon
//! accepts and answers without creating a VM), and how the guest dirties
//! its memory ([`dirtying`]: rate and working set, from the KVM dirty log).
//!
//! Exchange: Hello{mode: "probe"} → Accept; `n` page batches of junk; Go →
//! Confirm. RTT is the best of the Hello/Accept exchange and the Go/Confirm
//! exchange; bandwidth is the bytes over the time from the first batch to
//! Confirm. The destination stores the batches into fresh memory of its own
//! ([`PROBE_MEMORY`], freed at the end), as it would a migration's pages:
//! where that store is slower than the link (a host where fresh memory is
//! dear), the bandwidth measured is the store's.

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

/// How a running guest dirties its memory.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dirtying {
    /// Distinct bytes dirtied per second (before the working set, if one
    /// was found, bounds them).
    pub rate: f64,
    /// Bytes of the working set the guest went round within the window; 0
    /// where it kept writing new pages (no bound found).
    pub working_set: f64,
}

/// Watches the dirty log of a running `vm` for `window`, in the steps of
/// hybrid's sampling (`precopy::HOT_STEP`, 50 ms). A working set is found
/// where the window's second half added at most a twentieth to what its
/// first half saw (a guest that keeps writing new pages adds as much); the
/// rate is then taken over the first two steps, before the bound shows, and
/// otherwise over the whole window. Dirty logging is on only while it watches.
pub fn dirtying(vm: &vmm::Vm, window: Duration) -> Result<Dirtying> {
    vm.set_dirty_logging(true).map_err(Error::Vm)?;
    let watched = watch(vm, window);
    let off = vm.set_dirty_logging(false).map_err(Error::Vm);
    let seen = watched?;
    off?;
    Ok(from_steps(&seen))
}

/// [`dirtying`]'s reading of what it watched: distinct pages seen dirty so
/// far and seconds, at the start and after each step.
fn from_steps(seen: &[(u64, f64)]) -> Dirtying {
    let rate = |(pages, secs): (u64, f64)| pages as f64 * PAGE_SIZE as f64 / secs.max(1e-3);
    let all = seen.last().copied().unwrap_or_default();
    let half = seen
        .iter()
        .find(|s| s.1 >= all.1 / 2.0)
        .copied()
        .unwrap_or_default();
    let found = seen.len() > 4 && all.0 > 0 && (all.0 - half.0) * 20 <= half.0;
    Dirtying {
        rate: rate(if found { seen[2] } else { all }),
        working_set: if found {
            (all.0 * PAGE_SIZE as u64) as f64
        } else {
            0.0
        },
    }
}

/// Pages seen dirty so far (distinct) and seconds, at the start and after
/// each step of `window`.
fn watch(vm: &vmm::Vm, window: Duration) -> Result<Vec<(u64, f64)>> {
    let step = crate::precopy::HOT_STEP;
    vm.take_dirty_bitmap().map_err(Error::Vm)?;
    let start = Instant::now();
    let mut seen: Vec<u64> = Vec::new();
    let mut out = vec![(0, 0.0)];
    while start.elapsed() < window {
        std::thread::sleep(step.min(window));
        let bits = vm.take_dirty_bitmap().map_err(Error::Vm)?;
        seen.resize(bits.len(), 0);
        for (s, b) in seen.iter_mut().zip(bits) {
            *s |= b;
        }
        out.push((
            crate::bitmap::popcount(&seen),
            start.elapsed().as_secs_f64(),
        ));
    }
    Ok(out)
}

/// The scratch memory a destination stores a probe's pages into; batches
/// go round it, and a page outside it is refused.
pub const PROBE_MEMORY: u64 = 64 << 20;

/// Name of the probe mode in the Hello.
pub const PROBE_MODE: &str = "probe";

/// Probes `to` with `bytes` of page data (rounded up to whole batches).
pub fn probe(to: &str, bytes: u64, tls: Option<&TlsSetup>) -> Result<PathStats> {
    let mut stream = crate::precopy::connect(to, tls)?;
    stream.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err("socket timeout"))?;
    let t = Instant::now();
    handshake::hello(&mut stream, PROBE_MODE, no_vm())?;
    let rtt_hello = t.elapsed().as_secs_f64();
    let junk = vec![0x5au8; PAGE_SIZE];
    let pages: Vec<&[u8]> = (0..MAX_BATCH_PAGES).map(|_| &junk[..]).collect();
    let batch_bytes = (MAX_BATCH_PAGES * PAGE_SIZE) as u64;
    let batches = bytes.div_ceil(batch_bytes).max(1);
    let t = Instant::now();
    for b in 0..batches {
        // Each batch to pages the destination has not stored yet.
        let base = b * batch_bytes % PROBE_MEMORY;
        let offsets: Vec<u64> = (0..MAX_BATCH_PAGES as u64)
            .map(|p| base + p * PAGE_SIZE as u64)
            .collect();
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

/// The Hello's VM of a probe: none.
fn no_vm() -> wire::VmDescriptor {
    wire::VmDescriptor {
        name: String::new(),
        memory: 0,
        vcpus: 0,
        cpu_vendor: String::new(),
        cpu_features: Vec::new(),
    }
}

/// Destination side, after `Accept`: stores page batches into scratch memory
/// ([`PROBE_MEMORY`]) until Go, answers Confirm, and frees the memory.
pub fn serve(stream: &mut Link) -> Result<()> {
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new
    // descriptor or -1; nothing else is touched.
    let fd = unsafe { libc::memfd_create(c"migd-probe".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io_err("memfd_create for a probe")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is the new descriptor, owned by nothing else.
    let scratch = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    scratch
        .set_len(PROBE_MEMORY)
        .map_err(io_err("sizing a probe's memory"))?;
    let scratch = crate::incoming::GuestMem::file(scratch, PROBE_MEMORY);
    loop {
        // Pages, or Go: no control message of a probe is large.
        match wire::read_frame_up_to(stream, wire::MAX_SMALL_CONTROL)? {
            wire::Frame::Pages { offsets, data } => {
                crate::incoming::store_pages(&scratch, &offsets, &data)?
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps of 50 ms over 1 s, with `pages(t)` seen dirty by then.
    fn steps(pages: impl Fn(f64) -> u64) -> Vec<(u64, f64)> {
        (0..=20)
            .map(|k| k as f64 * 0.05)
            .map(|t| (pages(t), t))
            .collect()
    }

    /// A destination answering one probe as the daemon does; its result.
    fn destination() -> (String, std::thread::JoinHandle<Result<()>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || {
            let mut s = Link::plain(l.accept().unwrap().0);
            let hello = handshake::receive_hello(&mut s)?;
            let shared = handshake::accept(&mut s, &hello)?;
            handshake::receive_boot(&mut s, &shared)?;
            serve(&mut s)
        });
        (addr, t)
    }

    #[test]
    fn a_probe_stores_its_pages_round_the_scratch_memory() {
        // 96 MiB: more than the scratch memory, which the batches go round.
        let (addr, dest) = destination();
        let p = probe(&addr, 96 << 20, None).unwrap();
        assert!(p.bandwidth > 1e6 && p.rtt > 0.0, "{p:?}");
        dest.join().unwrap().unwrap();
    }

    #[test]
    fn a_probe_page_outside_the_scratch_memory_is_refused() {
        let (addr, dest) = destination();
        let mut s = crate::precopy::connect(&addr, None).unwrap();
        handshake::hello(&mut s, PROBE_MODE, no_vm()).unwrap();
        let page = vec![1u8; PAGE_SIZE];
        wire::write_pages(&mut s, &[PROBE_MEMORY], &[&page[..]]).unwrap();
        s.flush().unwrap();
        let e = dest.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
    }

    #[test]
    fn a_large_control_message_in_a_probe_is_refused_unread() {
        let (addr, dest) = destination();
        let mut s = crate::precopy::connect(&addr, None).unwrap();
        handshake::hello(&mut s, PROBE_MODE, no_vm()).unwrap();
        // A 1 MiB message where only pages and Go belong.
        let big = Message::Refuse {
            reason: "x".repeat(1 << 20),
        };
        let _ = wire::write_control(&mut s, &big);
        let _ = s.flush();
        let e = dest.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("at most 65536"), "{e}");
    }

    #[test]
    fn a_guest_going_round_its_working_set_shows_its_bound() {
        // 64 MiB gone round in 0.25 s, at 256 MiB/s.
        let d = from_steps(&steps(|t| ((t * 65536.0) as u64).min(16384)));
        assert_eq!(d.working_set, 64.0 * 1048576.0);
        assert!((d.rate / (256.0 * 1048576.0) - 1.0).abs() < 1e-3, "{d:?}");
    }

    #[test]
    fn a_guest_writing_new_pages_has_no_bound() {
        // 8 MiB/s into new pages all along: the rate over the whole second.
        let d = from_steps(&steps(|t| (t * 2048.0) as u64));
        assert_eq!(d.working_set, 0.0);
        assert!((d.rate / (8.0 * 1048576.0) - 1.0).abs() < 1e-3, "{d:?}");
        // One that writes nothing, or was watched too briefly to tell.
        assert_eq!(from_steps(&steps(|_| 0)), Dirtying::default());
        assert_eq!(from_steps(&[(0, 0.0), (10, 0.05)]).working_set, 0.0);
    }
}
