//! Page bitmaps: one bit per guest page, 64 pages per word, as the KVM dirty
//! log and the wire's received-bitmap lay them out.

use vmm::memory::PAGE_SIZE;

/// Whether page `pfn` is set in `bits`.
pub fn is_set(bits: &[u64], pfn: u64) -> bool {
    bits[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
}

/// Pages set in `bits`.
pub fn popcount(bits: &[u64]) -> u64 {
    bits.iter().map(|w| w.count_ones() as u64).sum()
}

/// The pages set in `bits`, in order.
pub fn set_pages(bits: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bits.iter().enumerate().flat_map(|(i, &w)| {
        let mut w = w;
        std::iter::from_fn(move || {
            (w != 0).then(|| {
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                i as u64 * 64 + b
            })
        })
    })
}

/// The first page set in `bits` at or after `from`.
pub fn next_set(bits: &[u64], from: u64) -> Option<u64> {
    let mut i = (from / 64) as usize;
    let mut w = *bits.get(i)? & (u64::MAX << (from % 64));
    loop {
        if w != 0 {
            return Some(i as u64 * 64 + w.trailing_zeros() as u64);
        }
        i += 1;
        w = *bits.get(i)?;
    }
}

/// The pages set in `bits` as runs of consecutive pages: (byte offset, pages).
pub fn to_runs(bits: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for off in set_pages(bits).map(|pfn| pfn * PAGE_SIZE) {
        match runs.last_mut() {
            Some((o, n)) if *o + *n * PAGE_SIZE == off => *n += 1,
            _ => runs.push((off, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(pfns: &[u64], words: usize) -> Vec<u64> {
        let mut b = vec![0u64; words];
        for &pfn in pfns {
            b[(pfn / 64) as usize] |= 1 << (pfn % 64);
        }
        b
    }

    #[test]
    fn runs_from_bitmap() {
        let b = bits(&[0, 1, 2, 5, 63, 64, 65, 127], 2);
        assert_eq!(
            to_runs(&b),
            vec![(0, 3), (5 * 4096, 1), (63 * 4096, 3), (127 * 4096, 1)]
        );
    }

    #[test]
    fn set_pages_are_found_counted_and_visited_in_order() {
        let pfns = [3u64, 64, 100, 191];
        let b = bits(&pfns, 3);
        assert_eq!(popcount(&b), 4);
        assert!(is_set(&b, 100) && !is_set(&b, 101));
        assert_eq!(set_pages(&b).collect::<Vec<_>>(), pfns);
        assert_eq!(set_pages(&[0, 0]).next(), None);
        assert_eq!(next_set(&b, 0), Some(3));
        assert_eq!(next_set(&b, 4), Some(64));
        assert_eq!(next_set(&b, 101), Some(191));
        assert_eq!(next_set(&b, 192), None);
    }
}
