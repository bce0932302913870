//! Post-copy and hybrid live migration.
//!
//! Source: (hybrid only) pre-copy rounds as in [`crate::precopy`]; then pause,
//! `PageMap` (the pages the destination must still receive: data extents or
//! dirty pages, with the dirty log covering the last moments, and no page
//! read, so the pause does not grow with memory), `UrgentListen` (a port on
//! the source the destination connects back to), `State`; the commit exchange (Ready, Go,
//! Confirm) is the pre-copy one, so the source never runs the VM again after Go.
//! After Confirm the destination runs the VM while pages arrive three ways,
//! each page exactly once from the source's point of view:
//!
//! - active push: the source streams every page not yet sent on the main
//!   connection, from a cursor that is re-centred on the latest fault;
//! - demand paging: the destination's fault thread reads userfaultfd events
//!   and sends `PageRequest` on the urgent channel (a second TCP connection, so
//!   requests and answers never wait behind bulk pushes);
//! - pre-paging: the source answers a request with the page plus up to
//!   `prepaging_window` following pages not yet sent.
//!
//! Under a bandwidth cap the push and the answers share it
//! (`Job::charge`): an answer goes first, the push waits for what answers
//! sent, and answers wait only once they alone run past the cap.
//!
//! A demanded page is sent even if the push already sent it (it may be in
//! flight behind megabytes of bulk data); the destination counts the second
//! arrival (`UFFDIO_COPY` says EEXIST) as a duplicate. Under a cap, where
//! the push's next page is often the one a sequential writer faults on, it
//! is not sent again while the push's connection has less than 64 KiB left
//! to send: that copy is right behind. When every expected page
//! has arrived the destination unregisters userfaultfd and sends
//! `PostcopyDone` with its statistics; only then does the source report the
//! migration completed (and its process may drop the VM's memory).
//!
//! Recovery: after the switch the VM's state is split between the hosts, so
//! neither side ever gives up on its own. Every post-copy socket has keepalive
//! and `TCP_USER_TIMEOUT` (`LINK_TIMEOUT`, 5 s) so that a dead link shows as an
//! error. The destination then keeps its VM (vCPUs wait on their faults, which
//! stay queued) and listens on the port it announced in `RecoverListen`; the
//! source keeps its paused copy and reconnects with back-off (or at once on
//! `migctl recover`): `RecoverHello` on a new main connection, answered with
//! the destination's received-bitmap (`Received`), then `RecoverHello` on a new
//! fault channel. The source re-sends every expected page not in the bitmap;
//! the destination re-asks its waiting faults. Only the operator ends a broken
//! phase: `migctl cancel` on the source (which then says which host holds what)
//! or destroying the VM on the destination.
//!
//! Destination: guest RAM is registered with userfaultfd (missing mode; the
//! memfd is shared memory, filled with `UFFDIO_COPY`) before the state is
//! loaded. Faults on pages that are not expected (zero pages, never sent) are
//! filled with zeros locally. Expected pages the source finds to be zeros
//! (`Zero`) are booked as received but left holes: they take no memory until
//! the guest touches them, and a fault on one is filled with zeros here. In
//! hybrid mode the expected pages already hold stale pre-copy data: their
//! holes are punched first so that they fault.

use link::Link;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use wire::Message;

use crate::{io_err, Error, Result};

mod dest;
mod source;

pub(crate) use dest::{open_fault_channel, receive};
pub use dest::{PostcopyIncoming, PostcopyWatch};
pub use source::migrate;

/// How long a post-copy connection may stay silent or leave data unacknowledged
/// before it counts as lost (TCP keepalive and `TCP_USER_TIMEOUT`).
const LINK_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes a dead post-copy link show as an error within [`LINK_TIMEOUT`] instead
/// of the kernel's ~15 minutes: keepalive probes every second on an idle
/// connection, and a cap on how long sent data may stay unacknowledged.
fn watch_link(s: &Link) -> Result<()> {
    s.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
    let secs = LINK_TIMEOUT.as_secs() as libc::c_int;
    let ms = LINK_TIMEOUT.as_millis() as libc::c_int;
    for (level, opt, val) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, secs),
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms),
    ] {
        // SAFETY: setsockopt with a valid fd and a c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                opt,
                &val as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io_err("setting the link timeout")(
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// The messages that carry the destination's received-bitmap: one
/// `Received`, or where that would not fit a frame, `ReceivedPart`s.
fn received_messages(bitmap: Vec<u64>) -> Vec<Message> {
    if bitmap.len() <= wire::RECEIVED_PART_WORDS {
        return vec![Message::Received { bitmap }];
    }
    let parts = bitmap.len().div_ceil(wire::RECEIVED_PART_WORDS);
    bitmap
        .chunks(wire::RECEIVED_PART_WORDS)
        .enumerate()
        .map(|(i, words)| Message::ReceivedPart {
            first_word: (i * wire::RECEIVED_PART_WORDS) as u64,
            words: words.to_vec(),
            last: i + 1 == parts,
        })
        .collect()
}

/// The messages that carry the `PageMap`'s `runs`: `PageMapPart`s of
/// `part` runs each where they would not fit one frame, then the `PageMap`
/// with the rest.
pub(crate) fn page_map_messages(mut runs: Vec<(u64, u64)>, part: usize) -> Vec<Message> {
    let part = part.max(1);
    let mut out = Vec::new();
    while runs.len() > part {
        let rest = runs.split_off(part);
        out.push(Message::PageMapPart { runs });
        runs = rest;
    }
    out.push(Message::PageMap { runs });
    out
}

/// Runs per `PageMapPart`: [`wire::PAGE_MAP_PART_RUNS`], or fewer where a
/// test asks (`MIGD_PAGE_MAP_PART_RUNS`, with fault injection on).
pub(crate) fn page_map_part_runs() -> usize {
    crate::faults::knob("MIGD_PAGE_MAP_PART_RUNS")
        .and_then(|n| n.parse().ok())
        .unwrap_or(wire::PAGE_MAP_PART_RUNS)
}

/// Destination: adds a `PageMapPart`'s runs to those gathered for the
/// `PageMap`; more runs than the guest has pages is a protocol error (runs
/// are disjoint, so no honest map has more).
pub(crate) fn gather_page_map_part(
    gathered: &mut Vec<(u64, u64)>,
    runs: Vec<(u64, u64)>,
    pages: u64,
) -> Result<()> {
    if (gathered.len() + runs.len()) as u64 > pages {
        return Err(Error::Protocol(format!(
            "PageMap parts of {} runs in all, for a guest of {pages} pages",
            gathered.len() + runs.len()
        )));
    }
    gathered.extend(runs);
    Ok(())
}

/// Source: the destination's received-bitmap of `len` words, from the
/// first `ReceivedPart` (`first_word`, `words`, `last`) and the parts that
/// follow on `r`. Parts out of order, or past `len`, are protocol errors.
fn read_received_parts(
    r: &mut impl std::io::Read,
    (mut first_word, mut words, mut last): (u64, Vec<u64>, bool),
    len: usize,
) -> Result<Vec<u64>> {
    let mut bitmap = Vec::new();
    loop {
        // An empty part before the last moves nothing on: a peer could send
        // them for ever.
        let empty = words.is_empty() && !last;
        if first_word != bitmap.len() as u64 || bitmap.len() + words.len() > len || empty {
            return Err(Error::Protocol(format!(
                "received-bitmap part of {} words at word {first_word} after {} of {len}",
                words.len(),
                bitmap.len()
            )));
        }
        bitmap.extend_from_slice(&words);
        if last {
            return Ok(bitmap);
        }
        match wire::expect_control_up_to(r, "ReceivedPart", wire::MAX_FRAME)? {
            Message::ReceivedPart {
                first_word: f,
                words: w,
                last: l,
            } => (first_word, words, last) = (f, w, l),
            other => {
                return Err(Error::Protocol(format!(
                    "expected ReceivedPart, got {}",
                    other.name()
                )))
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Nice value of the threads that move post-copy's pages (see
/// [`set_thread_nice`]); 0 leaves them as they are.
static THREAD_NICE: AtomicI32 = AtomicI32::new(0);

/// Sets the nice value (-20..=0) that post-copy's page threads take for their
/// lifetime, on both sides: the source's push and fault answers, the
/// destination's readers and fault thread; and lazy restore's filler and
/// fault thread (post-copy from a file). On a host whose cores are all busy
/// they then run before vCPUs (the arriving guest's own, spinning on the pages
/// it has, above all), and the phase in which a VM's memory is on two hosts
/// ends sooner; with idle cores it changes nothing. Below 0 needs
/// `CAP_SYS_NICE`; without it the threads keep their priority, with a warning.
pub fn set_thread_nice(nice: i32) {
    THREAD_NICE.store(nice.clamp(-20, 0), Ordering::Relaxed);
}

/// How much further below post-copy's nice value the threads on a fault's
/// path run than those that move pages in bulk.
const FAULT_PATH_BOOST: i32 = 5;

/// Gives the calling thread post-copy's nice value, if one is set; a thread
/// on a fault's path (`answers_faults`: reading faults, serving requests,
/// reading their answers) runs [`FAULT_PATH_BOOST`] further ahead, so that
/// on a host whose cores are busy with the bulk push a waiting vCPU's page
/// does not wait for a time slice behind it.
pub(crate) fn prioritize_this_thread(answers_faults: bool) {
    let nice = THREAD_NICE.load(Ordering::Relaxed);
    if nice == 0 {
        return;
    }
    let nice = if answers_faults {
        (nice - FAULT_PATH_BOOST).max(-20)
    } else {
        nice
    };
    // SAFETY: plain system calls on this thread's own id; no memory is passed.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(nice, "post-copy thread keeps its priority: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_received_bitmap_too_large_for_a_frame_goes_in_parts() {
        // A small one: one Received, as ever.
        assert_eq!(
            received_messages(vec![7; 10]),
            vec![Message::Received {
                bitmap: vec![7; 10]
            }]
        );
        // 1 TiB of guest, nearly every page received: ~38 MB encoded whole.
        let len = (1usize << 40) / 4096 / 64;
        let bitmap: Vec<u64> = (0..len as u64).map(|i| u64::MAX - (i % 3)).collect();
        assert!(matches!(
            wire::encode_control(&Message::Received {
                bitmap: bitmap.clone()
            }),
            Err(wire::WireError::FrameSize(_))
        ));
        let msgs = received_messages(bitmap.clone());
        assert_eq!(msgs.len(), 2);
        let mut wire_bytes = Vec::new();
        for m in &msgs {
            wire::write_control(&mut wire_bytes, m).unwrap();
        }
        let mut r = &wire_bytes[..];
        let first = match wire::expect_control_up_to(&mut r, "Received", wire::MAX_FRAME).unwrap() {
            Message::ReceivedPart {
                first_word,
                words,
                last,
            } => (first_word, words, last),
            m => panic!("{m:?}"),
        };
        assert_eq!(read_received_parts(&mut r, first, len).unwrap(), bitmap);
        assert!(r.is_empty());
        // Parts out of order, or more words than the guest has pages for.
        let part = |first_word: u64, n: usize, last: bool| (first_word, vec![0u64; n], last);
        let e = read_received_parts(&mut &[][..], part(5, 3, true), 10).unwrap_err();
        assert!(e.to_string().contains("at word 5 after 0 of 10"), "{e}");
        let e = read_received_parts(&mut &[][..], part(0, 11, true), 10).unwrap_err();
        assert!(e.to_string().contains("part of 11 words"), "{e}");
        // An empty part before the last (a peer could send those for ever).
        let e = read_received_parts(&mut &[][..], part(0, 0, false), 10).unwrap_err();
        assert!(e.to_string().contains("part of 0 words"), "{e}");
        // A part that is not the last, and then something else.
        let mut more = Vec::new();
        wire::write_control(&mut more, &Message::Go).unwrap();
        let e = read_received_parts(&mut &more[..], part(0, 4, false), 10).unwrap_err();
        assert!(
            e.to_string().contains("expected ReceivedPart, got Go"),
            "{e}"
        );
    }

    #[test]
    fn a_page_map_too_fragmented_for_a_frame_goes_in_parts() {
        // A small one: one PageMap, as ever.
        assert_eq!(
            page_map_messages(vec![(0, 1)], wire::PAGE_MAP_PART_RUNS),
            vec![Message::PageMap { runs: vec![(0, 1)] }]
        );
        // Every other page of a 12 TiB guest's top 32 GiB: 4 Mi runs with
        // large offsets, ~42 MB encoded whole.
        let base = 12u64 << 40;
        let runs: Vec<(u64, u64)> = (0..4u64 << 20).map(|i| (base + i * 8192, 1)).collect();
        assert!(matches!(
            wire::encode_control(&Message::PageMap { runs: runs.clone() }),
            Err(wire::WireError::FrameSize(_))
        ));
        let msgs = page_map_messages(runs.clone(), wire::PAGE_MAP_PART_RUNS);
        assert_eq!(msgs.len(), 4);
        // Each part fits a frame; gathered, they give the runs back in order.
        let pages = (base >> 12) + (8 << 20);
        let mut gathered = Vec::new();
        for m in msgs {
            wire::encode_control(&m).unwrap();
            match m {
                Message::PageMapPart { runs } => {
                    gather_page_map_part(&mut gathered, runs, pages).unwrap()
                }
                Message::PageMap { mut runs } => gathered.append(&mut runs),
                m => panic!("{m:?}"),
            }
        }
        assert_eq!(gathered, runs);
        // Exactly a part's worth goes whole; one run more, in two.
        let msgs = page_map_messages(vec![(0, 1), (8192, 1)], 2);
        assert_eq!(msgs.len(), 1);
        let msgs = page_map_messages(vec![(0, 1), (8192, 1), (16384, 1)], 2);
        assert!(
            matches!(&msgs[..], [Message::PageMapPart { runs: a }, Message::PageMap { runs: b }] if a.len() == 2 && b.len() == 1)
        );
        // More runs than the guest has pages.
        let mut gathered = vec![(0, 1); 6];
        let e = gather_page_map_part(&mut gathered, vec![(0, 1); 5], 10).unwrap_err();
        assert!(
            e.to_string()
                .contains("11 runs in all, for a guest of 10 pages"),
            "{e}"
        );
    }
}
