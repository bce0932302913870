//! Page batches on plaintext links without a copy through user space.
//!
//! The source hands guest pages to its socket with `sendfile` from the guest
//! memfd: the kernel queues references to the pages instead of copying them
//! into socket buffers. The destination moves page data from its socket into
//! its own memfd with `splice` through a pipe: the one copy left is the
//! kernel's, from socket buffers into guest memory. The wire format is the
//! same page batch as ever; only the system calls differ, so either side may
//! use them alone (TLS links cannot: their records are sealed in user space).
//!
//! A page the guest rewrites after it was handed over may reach the
//! destination in its newer form, or torn between both. That is safe for the
//! same reason pre-copy is: the write is in the dirty log, so the page is sent
//! again in a later round or in the stop-and-copy, which runs with the vCPUs
//! paused. Delta compression needs to know exactly what was sent, so it
//! turns this path off.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use link::Link;

/// Bytes the pipe between socket and memfd holds (1 MiB, the kernel's
/// default `pipe-max-size`: a page batch in one or two `splice` calls).
const PIPE_BYTES: usize = 1 << 20;

/// Writes a page batch: `header` (from [`wire::page_batch_header`]), then the
/// pages of `runs` ((memfd offset, bytes), in batch order) straight from `memfd`.
/// A batch still not accepted after `limit` is an error (`TimedOut`): a
/// receiver that stopped reading still lets a trickle through (the kernel
/// collapses its receive queue to make room), and each trickle would
/// otherwise restart the socket's send timeout.
pub(crate) fn send_batch(
    sock: &TcpStream,
    memfd: &File,
    header: &[u8],
    runs: &[(u64, usize)],
    limit: Duration,
) -> io::Result<()> {
    let deadline = Instant::now() + limit;
    let in_time = || {
        if Instant::now() < deadline {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("a page batch was not accepted in {} s", limit.as_secs()),
            ))
        }
    };
    let fd = sock.as_raw_fd();
    let mut rest = header;
    while !rest.is_empty() {
        // MSG_MORE: the header leaves in the same segment as the first pages.
        // SAFETY: a live socket and a live buffer of `rest.len()` bytes.
        let n = unsafe {
            libc::send(
                fd,
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_MORE | libc::MSG_NOSIGNAL,
            )
        };
        match n {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n if n > 0 => rest = &rest[n as usize..],
            _ => retry_or(io::Error::last_os_error())?,
        }
        in_time()?;
    }
    for &(off, len) in runs {
        let end = off + len as u64;
        let mut pos = off as libc::off_t;
        while (pos as u64) < end {
            // SAFETY: live descriptors; the kernel advances `pos`.
            let n = unsafe {
                libc::sendfile(fd, memfd.as_raw_fd(), &mut pos, (end - pos as u64) as usize)
            };
            match n {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "guest memory ended inside a page batch",
                    ))
                }
                n if n > 0 => {}
                _ => retry_or(io::Error::last_os_error())?,
            }
            in_time()?;
        }
    }
    Ok(())
}

/// `Ok` for an interrupted call (to be retried), the error otherwise.
fn retry_or(e: io::Error) -> io::Result<()> {
    match e.kind() {
        io::ErrorKind::Interrupted => Ok(()),
        _ => Err(e),
    }
}

/// Moves page data from a socket into a memfd through a pipe of its own.
pub(crate) struct Splicer {
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    /// Most bytes one `splice` from the socket asks for.
    capacity: usize,
}

impl Splicer {
    /// A pipe of [`PIPE_BYTES`] (or what the kernel allows).
    pub(crate) fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned here alone.
        let (pipe_r, pipe_w) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a pipe we own; on failure the default size stays.
        let size =
            unsafe { libc::fcntl(pipe_w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES as i32) };
        let capacity = if size > 0 { size as usize } else { 64 << 10 };
        Ok(Splicer {
            pipe_r,
            pipe_w,
            capacity,
        })
    }

    /// Stores the data of a page batch whose header `r` has just read into
    /// `memfd` at `runs` ((memfd offset, bytes), checked by the caller). What
    /// `r` buffered already is written from there; the rest is spliced.
    pub(crate) fn receive(
        &mut self,
        r: &mut BufReader<Link>,
        memfd: &File,
        runs: &[(u64, usize)],
    ) -> io::Result<()> {
        let sock = r.get_ref().tcp().as_raw_fd();
        // Bytes of this batch still in the socket (not in `r`, not in the pipe).
        let mut on_wire: usize = runs.iter().map(|&(_, len)| len).sum();
        let mut in_pipe = 0usize;
        for &(off, len) in runs {
            let buffered = r.buffer();
            let k = buffered.len().min(len);
            memfd.write_all_at(&buffered[..k], off)?;
            r.consume(k);
            on_wire -= k;
            let (mut pos, end) = (off + k as u64, off + len as u64);
            while pos < end {
                if in_pipe == 0 {
                    let want = on_wire.min(self.capacity);
                    in_pipe = splice(sock, self.pipe_w.as_raw_fd(), None, want)?;
                    on_wire -= in_pipe;
                }
                let want = in_pipe.min((end - pos) as usize);
                let n = splice(self.pipe_r.as_raw_fd(), memfd.as_raw_fd(), Some(pos), want)?;
                in_pipe -= n;
                pos += n as u64;
            }
        }
        Ok(())
    }
}

/// One `splice` of up to `len` bytes from `from` (a socket or a pipe) to
/// `to`, at file offset `to_off` (`None` for a pipe). Moving nothing is an
/// error: the connection ended.
fn splice(from: i32, to: i32, to_off: Option<u64>, len: usize) -> io::Result<usize> {
    let mut off = to_off.map(|o| o as libc::loff_t);
    loop {
        let to_off = match &mut off {
            Some(o) => o as *mut libc::loff_t,
            None => std::ptr::null_mut(),
        };
        // SAFETY: live descriptors; the offset, where given, lives across the call.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                to_off,
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        match n {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection ended inside a page batch",
                ))
            }
            n if n > 0 => return Ok(n as usize),
            _ => retry_or(io::Error::last_os_error())?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use vmm::memory::PAGE_SIZE;

    const PAGE: usize = PAGE_SIZE as usize;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (a, l.accept().unwrap().0)
    }

    /// A zeroed memfd of `pages` pages.
    fn memfd(pages: usize) -> File {
        // SAFETY: a valid name; the new descriptor is owned by the File.
        let fd = unsafe { libc::memfd_create(c"zerocopy-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created, owned here alone.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len((pages * PAGE) as u64).unwrap();
        f
    }

    /// A memfd of `pages` pages, page i filled with byte i+1.
    fn source(pages: usize) -> File {
        let f = memfd(pages);
        for i in 0..pages {
            f.write_all_at(&vec![i as u8 + 1; PAGE], (i * PAGE) as u64)
                .unwrap();
        }
        f
    }

    #[test]
    fn batches_go_from_memfd_to_memfd_with_the_buffered_prefix_written_first() {
        let src = source(64);
        let dst = memfd(64);
        let (a, b) = pair();
        // Scattered and adjacent pages, in an order that is not sorted.
        let offsets: Vec<u64> = [7u64, 8, 9, 3, 40, 41, 0]
            .iter()
            .map(|p| p * PAGE_SIZE)
            .collect();
        let runs = crate::incoming::page_runs(64 * PAGE_SIZE, &offsets).unwrap();
        assert_eq!(runs.len(), 4);
        let header = wire::page_batch_header(&offsets).unwrap();
        send_batch(&a, &src, &header, &runs, Duration::from_secs(10)).unwrap();
        // A second batch right behind the first must stay in the socket.
        let second = [63 * PAGE_SIZE];
        let runs2 = crate::incoming::page_runs(64 * PAGE_SIZE, &second).unwrap();
        send_batch(
            &a,
            &src,
            &wire::page_batch_header(&second).unwrap(),
            &runs2,
            Duration::from_secs(10),
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        // The reader's buffer takes the header and part of the first page.
        let mut r = BufReader::with_capacity(header.len() + 1000, Link::plain(b));
        let h = wire::read_header(&mut r).unwrap();
        assert_eq!(
            wire::read_batch_offsets(&mut r, h.body_len).unwrap(),
            offsets
        );
        assert!(!r.buffer().is_empty(), "the test wants a buffered prefix");
        let mut s = Splicer::new().unwrap();
        s.receive(&mut r, &dst, &runs).unwrap();
        let h = wire::read_header(&mut r).unwrap();
        assert_eq!(
            wire::read_batch_offsets(&mut r, h.body_len).unwrap(),
            second
        );
        s.receive(&mut r, &dst, &runs2).unwrap();
        let mut page = vec![0u8; PAGE];
        for p in 0..64u64 {
            dst.read_exact_at(&mut page, p * PAGE_SIZE).unwrap();
            let sent = offsets.contains(&(p * PAGE_SIZE)) || p == 63;
            let want = if sent { p as u8 + 1 } else { 0 };
            assert!(page.iter().all(|&b| b == want), "page {p}");
        }
    }

    #[test]
    fn a_batch_cut_short_is_an_error_and_not_a_hang() {
        let dst = memfd(16);
        let (mut a, b) = pair();
        let runs = [(0u64, 4 * PAGE)];
        a.write_all(&[5u8; 3 * PAGE]).unwrap();
        drop(a);
        let mut r = BufReader::with_capacity(64, Link::plain(b));
        let mut first = [0u8; 10];
        r.read_exact(&mut first).unwrap();
        let e = Splicer::new()
            .unwrap()
            .receive(&mut r, &dst, &runs)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}
