//! How storing received pages into a fresh shmem memfd scales with threads:
//! `pwrite` (what the destination does) against copying through a shared
//! mapping. Run: cargo run --release -p migration --example store_scaling
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::time::Instant;

const SIZE: usize = 768 << 20;
const BATCH: usize = 256 * 4096;

fn memfd() -> std::fs::File {
    // SAFETY: a new descriptor, owned by the File.
    let fd = unsafe { libc::memfd_create(c"store-scaling".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` is ours alone.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(SIZE as u64).unwrap();
    f
}

fn run(threads: usize, map: bool) -> f64 {
    let f = memfd();
    // SAFETY: a shared mapping of the whole memfd, unmapped at the end.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    } as usize;
    let data = vec![0x5au8; BATCH];
    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..threads {
            let (f, data) = (&f, &data);
            s.spawn(move || {
                // Stream i's 2 MiB chunks, as multifd partitions them.
                let mut off = i * (2 << 20);
                while off < SIZE {
                    for b in (0..(2 << 20)).step_by(BATCH) {
                        if map {
                            // SAFETY: inside the mapping.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    data.as_ptr(),
                                    (base + off + b) as *mut u8,
                                    BATCH,
                                )
                            };
                        } else {
                            f.write_all_at(data.as_slice(), (off + b) as u64).unwrap();
                        }
                    }
                    off += threads * (2 << 20);
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(base as *mut libc::c_void, SIZE) };
    SIZE as f64 / secs / 1e6
}

fn main() {
    for map in [false, true] {
        for threads in [1, 2, 4] {
            let mut r: Vec<f64> = (0..3).map(|_| run(threads, map)).collect();
            r.sort_by(f64::total_cmp);
            println!(
                "{} {threads} thread(s): {:.0} MB/s (min {:.0}, max {:.0})",
                if map { "mapping" } else { "pwrite " },
                r[1],
                r[0],
                r[2]
            );
        }
    }
}
