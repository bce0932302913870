//! How storing received pages into a fresh shmem memfd scales with threads:
//! `pwrite` (what the destination does) against copying through a shared
//! mapping; then, on one thread, where the time of a fresh page goes
//! (allocation, the write path, the copy itself).
//! Run: cargo run --release -p migration --example store_scaling
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

/// µs per page of `f` over a fresh memfd (median of 3).
fn per_page(f: impl Fn(&std::fs::File, &[u8])) -> f64 {
    let data = vec![0x5au8; BATCH];
    let mut r: Vec<f64> = (0..3)
        .map(|_| {
            let m = memfd();
            let t = Instant::now();
            f(&m, &data);
            t.elapsed().as_secs_f64() * 1e6 / (SIZE / 4096) as f64
        })
        .collect();
    r.sort_by(f64::total_cmp);
    r[1]
}

fn pwrite_all(m: &std::fs::File, data: &[u8]) {
    for off in (0..SIZE).step_by(BATCH) {
        m.write_all_at(data, off as u64).unwrap();
    }
}

fn allocate(m: &std::fs::File) {
    // SAFETY: fallocate on a descriptor we own.
    let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(m), 0, 0, SIZE as i64) };
    assert_eq!(r, 0);
}

fn main() {
    println!("one thread, µs per 4 KiB page:");
    let holes = per_page(pwrite_all);
    let alloc = per_page(|m, _| allocate(m));
    // Allocation and writes, less the allocation measured alone.
    let over = per_page(|m, d| {
        allocate(m);
        pwrite_all(m, d);
    }) - alloc;
    let mut dst = vec![1u8; SIZE];
    let data = vec![0x5au8; BATCH];
    let t = Instant::now();
    for off in (0..SIZE).step_by(BATCH) {
        dst[off..off + BATCH].copy_from_slice(std::hint::black_box(&data));
    }
    std::hint::black_box(&dst);
    let copy = t.elapsed().as_secs_f64() * 1e6 / (SIZE / 4096) as f64;
    // A write fault on fresh anonymous memory, for comparison.
    let mut faults: Vec<f64> = (0..3)
        .map(|_| {
            // SAFETY: a new private mapping, unmapped below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            } as *mut u8;
            assert!(p as isize != -1);
            let t = Instant::now();
            for off in (0..SIZE).step_by(4096) {
                // SAFETY: inside the mapping.
                unsafe { p.add(off).write_volatile(1) };
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / (SIZE / 4096) as f64;
            // SAFETY: the mapping made above.
            unsafe { libc::munmap(p as *mut libc::c_void, SIZE) };
            us
        })
        .collect();
    faults.sort_by(f64::total_cmp);
    let fault = faults[1];
    println!("  pwrite into holes (what a destination does): {holes:.2}");
    println!("  fallocate alone (allocation):                {alloc:.2}");
    println!("  pwrite into allocated pages (write path):    {over:.2}");
    println!("  memcpy in user space (the copy alone):       {copy:.2}");
    println!("  write fault on fresh anonymous memory:       {fault:.2}");
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
