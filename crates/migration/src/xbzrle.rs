//! Delta compression of re-sent pages (XBZRLE, Svärd et al., VEE 2011): the
//! source keeps what it last sent of each page in a bounded cache; when it
//! sends the page again it sends only the runs of bytes that changed, and the
//! destination applies them to the copy it holds.
//!
//! Encoding of one page against its previous content: repeated
//! `varint same, varint diff, diff bytes` (a run of unchanged bytes, then a
//! run of new bytes), covering exactly the 4096 bytes of the page.

use vmm::memory::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;

/// A delta larger than this goes as the whole page instead (QEMU's "overflow").
pub const MAX_DELTA: usize = PAGE / 2;

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &[u8], at: &mut usize) -> Result<usize, String> {
    let mut v = 0usize;
    for shift in [0, 7] {
        let byte = *b.get(*at).ok_or("delta ends inside a length")?;
        *at += 1;
        v |= ((byte & 0x7f) as usize) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("delta length over two bytes".into())
}

/// Encodes `new` against `old`; None when the delta would exceed `limit` bytes.
pub fn encode(old: &[u8], new: &[u8], limit: usize) -> Option<Vec<u8>> {
    debug_assert!(old.len() == PAGE && new.len() == PAGE);
    // The delta holds every changed byte: if they alone are over the limit
    // (a page rewritten whole), say so before encoding anything. This count
    // vectorizes; the encoder below goes run by run.
    let changed = old.iter().zip(new).filter(|(a, b)| a != b).count();
    if changed > limit {
        return None;
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < PAGE {
        // Unchanged run, compared a word at a time where possible.
        let start = i;
        while i + 8 <= PAGE && old[i..i + 8] == new[i..i + 8] {
            i += 8;
        }
        while i < PAGE && old[i] == new[i] {
            i += 1;
        }
        let same = i - start;
        let start = i;
        while i < PAGE && old[i] != new[i] {
            i += 1;
        }
        let diff = i - start;
        put_varint(&mut out, same);
        put_varint(&mut out, diff);
        out.extend_from_slice(&new[start..i]);
        if out.len() > limit {
            return None;
        }
    }
    Some(out)
}

/// The runs of new bytes in `delta`, as (offset in the page, bytes), after
/// checking that the delta is well formed and covers exactly one page.
pub fn runs(delta: &[u8]) -> Result<Vec<(usize, &[u8])>, String> {
    let mut runs = Vec::new();
    let (mut at, mut pos) = (0usize, 0usize);
    while at < delta.len() {
        let same = get_varint(delta, &mut at)?;
        let diff = get_varint(delta, &mut at)?;
        let data = at;
        at = at
            .checked_add(diff)
            .filter(|&e| e <= delta.len())
            .ok_or("delta shorter than its runs")?;
        pos = pos
            .checked_add(same)
            .and_then(|p| p.checked_add(diff))
            .filter(|&p| p <= PAGE)
            .ok_or("delta runs past the end of the page")?;
        if diff > 0 {
            runs.push((pos - diff, &delta[data..at]));
        }
    }
    if pos != PAGE {
        return Err(format!("delta covers {pos} of {PAGE} bytes"));
    }
    Ok(runs)
}

/// Applies `delta` to `page` in place; an error names what is malformed and
/// leaves `page` as it was.
pub fn decode(delta: &[u8], page: &mut [u8]) -> Result<(), String> {
    if page.len() != PAGE {
        return Err(format!("page of {} bytes", page.len()));
    }
    // Check everything before changing anything.
    for (p, bytes) in runs(delta)? {
        page[p..p + bytes.len()].copy_from_slice(bytes);
    }
    Ok(())
}

/// What was last sent of each page, up to a byte budget. Direct-mapped, as
/// QEMU's: page `pfn` lives in slot `pfn % slots` and evicts only the page
/// that held that slot, so a working set a little larger than the cache still
/// mostly hits (with oldest-first eviction a sequential sweep of such a set
/// would miss on every page). The slots are one allocation, touched lazily.
pub struct Cache {
    /// The page each slot holds, plus one (0: none): zeroed memory, so that
    /// a cache costs only the slots it uses (several are made and dropped
    /// as multifd sets up).
    tags: Box<[u64]>,
    data: Box<[u8]>,
    /// Interleaving (multifd): this cache sees only one chunk of every `ways`
    /// chunks of `chunk` pages; the others' pfns are squeezed out of the slot
    /// index so that every slot is used.
    chunk: u64,
    ways: u64,
}

impl Cache {
    /// A cache of `bytes` (whole pages). If the host cannot allocate it, the
    /// cache has no slots (every page is sent whole) and a warning says so.
    pub fn new(bytes: u64) -> Cache {
        let slots = usize::try_from(bytes / PAGE_SIZE).unwrap_or(usize::MAX);
        // Zeroed memory from the allocator: mapped on first write.
        let data = slots
            .checked_mul(PAGE)
            .and_then(zeroed::<u8>)
            .filter(|d| d.len() == slots * PAGE);
        let tags = zeroed::<u64>(slots).filter(|t| t.len() == slots);
        match (data, tags) {
            (Some(data), Some(tags)) => Cache {
                tags,
                data,
                chunk: 1,
                ways: 1,
            },
            _ => {
                tracing::warn!(bytes, "cannot allocate the XBZRLE cache: pages go whole");
                Cache {
                    tags: Box::default(),
                    data: Box::default(),
                    chunk: 1,
                    ways: 1,
                }
            }
        }
    }

    /// A cache for the pages of one of `ways` streams that take turns by
    /// chunks of `chunk` pages (multifd's partition).
    pub fn interleaved(bytes: u64, chunk: u64, ways: u64) -> Cache {
        Cache {
            chunk: chunk.max(1),
            ways: ways.max(1),
            ..Cache::new(bytes)
        }
    }

    fn slot(&self, pfn: u64) -> Option<usize> {
        let index = (pfn / self.chunk / self.ways) * self.chunk + pfn % self.chunk;
        (!self.tags.is_empty()).then(|| (index % self.tags.len() as u64) as usize)
    }

    /// The previous content of `pfn`, if cached.
    pub fn get(&self, pfn: u64) -> Option<&[u8]> {
        let i = self.slot(pfn)?;
        (self.tags[i] == pfn.wrapping_add(1)).then(|| &self.data[i * PAGE..(i + 1) * PAGE])
    }

    /// Records `data` as the content of `pfn` last sent.
    pub fn put(&mut self, pfn: u64, data: &[u8]) {
        if let Some(i) = self.slot(pfn) {
            self.tags[i] = pfn.wrapping_add(1);
            self.data[i * PAGE..(i + 1) * PAGE].copy_from_slice(data);
        }
    }
}

/// `len` zeroed elements, or None if the allocator refuses. Only for types
/// whose all-zero bit pattern is a value (`u8`, `u64`).
fn zeroed<T: Copy>(len: usize) -> Option<Box<[T]>> {
    // Not `vec![0; len]`: it aborts when the allocator refuses.
    let layout = std::alloc::Layout::array::<T>(len).ok()?;
    if layout.size() == 0 {
        return Some(Box::default());
    }
    // SAFETY: `layout` has a non-zero size; a non-null result is `len`
    // zeroed elements (valid values of the integer types this is used
    // with) owned by the returned box, allocated with the global allocator
    // and the layout of a `[T]` of that length.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<T>();
        if p.is_null() {
            return None;
        }
        Some(Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_small_and_big_changes() {
        let old: Vec<u8> = (0..PAGE).map(|i| (i * 7) as u8).collect();
        let mut new = old.clone();
        new[0..8].copy_from_slice(&42u64.to_le_bytes());
        new[4095] ^= 1;
        let d = encode(&old, &new, MAX_DELTA).unwrap();
        assert!(d.len() < 24, "{} bytes", d.len());
        let mut page = old.clone();
        decode(&d, &mut page).unwrap();
        assert_eq!(page, new);
        // Unchanged page: a few bytes; fully changed: overflow.
        assert!(encode(&old, &old, MAX_DELTA).unwrap().len() <= 4);
        let other: Vec<u8> = old.iter().map(|b| !b).collect();
        assert!(encode(&old, &other, MAX_DELTA).is_none());
        let d = encode(&old, &other, PAGE * 2).unwrap();
        let mut page = old.clone();
        decode(&d, &mut page).unwrap();
        assert_eq!(page, other);
    }

    #[test]
    fn malformed_deltas_are_errors_and_change_nothing() {
        let old = vec![5u8; PAGE];
        for bad in [
            &[0x80u8][..],              // cut varint
            &[0xff, 0xff, 0x01][..],    // three-byte varint
            &[0x00, 0x05, 1, 2][..],    // diff longer than the data
            &[0x80, 0x40, 0x00][..],    // 8192 unchanged bytes: past the page
            &[0x10, 0x00][..],          // covers 16 of 4096 bytes
            &[0x80, 0x20, 0x01, 9][..], // 4096 + 1 bytes
        ] {
            let mut page = old.clone();
            assert!(decode(bad, &mut page).is_err(), "{bad:?}");
            assert_eq!(page, old);
        }
    }

    #[test]
    fn cache_keeps_the_newest_pages_within_budget() {
        let mut c = Cache::new(2 * PAGE_SIZE);
        for pfn in 0..3u64 {
            c.put(pfn, &vec![pfn as u8; PAGE]);
        }
        assert!(c.get(0).is_none());
        assert_eq!(c.get(2).unwrap()[0], 2);
        c.put(1, &vec![9; PAGE]);
        assert_eq!(c.get(1).unwrap()[0], 9);
        assert!(Cache::new(0).get(0).is_none());
    }

    #[test]
    fn an_interleaved_cache_uses_every_slot() {
        // Stream 1 of 4, chunks of 8 pages: pfns 8..16, 40..48, 72..80, ...
        let mut c = Cache::interleaved(64 * PAGE_SIZE, 8, 4);
        let page = vec![1u8; PAGE];
        let mine: Vec<u64> = (0..256u64).filter(|p| p / 8 % 4 == 1).collect();
        assert_eq!(mine.len(), 64);
        for &pfn in &mine {
            c.put(pfn, &page);
        }
        assert!(
            mine.iter().all(|&p| c.get(p).is_some()),
            "64 pages in 64 slots"
        );
    }

    #[test]
    fn a_sweep_slightly_larger_than_the_cache_mostly_hits() {
        let slots = 1000u64;
        let mut c = Cache::new(slots * PAGE_SIZE);
        let page = vec![1u8; PAGE];
        for pfn in 0..slots + 10 {
            c.put(pfn, &page);
        }
        let hits = (0..slots + 10).filter(|&p| c.get(p).is_some()).count() as u64;
        // Only pages 0..10 lost their slots (to 1000..1010).
        assert_eq!(hits, slots);
        assert!(c.get(0).is_none() && c.get(10).is_some());
        // A cache the host cannot hold has no slots instead of aborting.
        let huge = Cache::new(u64::MAX / 2);
        assert!(huge.get(0).is_none());
    }
}
