//! The bodies of the fuzz targets, one function per target, shared by the
//! libFuzzer binaries in `fuzz_targets/` and by the CI smoke test (`tests/ops.rs`
//! includes this file), so both feed the very same code. Each function must not
//! panic on any input; the asserts inside are properties the decoders promise.

use std::path::Path;

/// `wire_decode`: a stream of migration frames, then the same bytes as one frame.
pub fn wire_decode(data: &[u8]) {
    let mut cur = data;
    // A stream of frames, as the destination reads it.
    for _ in 0..64 {
        if wire::read_frame(&mut cur).is_err() {
            break;
        }
    }
    let _ = wire::decode_frame(data);
}

/// `link_records`: bytes as TLS records of a migration link, opened with a
/// fixed key (tampered, truncated and garbage records must be errors).
pub fn link_records(data: &[u8]) {
    let n = link::open_records_for_fuzzing(data);
    assert!(n <= data.len(), "more plaintext than input");
    // What the sealer makes, the opener takes back whole.
    let sealed = link::seal_records_for_fuzzing(data);
    assert_eq!(link::open_records_for_fuzzing(&sealed), data.len());
}

/// `xbzrle_decode`: a delta applied to a page; a delta that decodes produces
/// a whole page, and what encode makes, decode undoes.
pub fn xbzrle_decode(data: &[u8]) {
    use migration::xbzrle;
    let old: Vec<u8> = (0..4096).map(|i| (i * 13 % 251) as u8).collect();
    let mut page = old.clone();
    if xbzrle::decode(data, &mut page).is_err() {
        assert_eq!(page, old, "a rejected delta changed the page");
    }
    // Round trip: the input as the new content of part of the page.
    let mut new = old.clone();
    let n = data.len().min(4096);
    new[..n].copy_from_slice(&data[..n]);
    if let Some(d) = xbzrle::encode(&old, &new, 8192) {
        let mut p = old.clone();
        xbzrle::decode(&d, &mut p).expect("an encoded delta decodes");
        assert_eq!(p, new, "decode(encode(new)) != new");
    }
}

/// `state_decode`: a VM state blob; what decodes must encode again, stably.
pub fn state_decode(data: &[u8]) {
    let Ok(state) = vmm::VmState::decode(data) else {
        return;
    };
    let again = state.encode().expect("a decoded state encodes");
    let state2 = vmm::VmState::decode(&again).expect("an encoded state decodes");
    assert_eq!(
        state2.encode().expect("re-encode"),
        again,
        "encoding is not stable"
    );
}

/// `snapshot_read`: the bytes as a snapshot file at `scratch` (best on tmpfs), read
/// eagerly and lazily; then, for input that starts like a snapshot, again with
/// every checksum made right, so that mutations reach the checks behind them.
pub fn snapshot_read(data: &[u8], scratch: &Path) {
    snapshot_read_one(data, scratch);
    if data.starts_with(vmm::snapshot::MAGIC) {
        let fixed = fix_checksums(data);
        if fixed != data {
            snapshot_read_one(&fixed, scratch);
        }
    }
}

fn snapshot_read_one(data: &[u8], scratch: &Path) {
    if std::fs::write(scratch, data).is_err() {
        return;
    }
    let eager = vmm::snapshot::read(scratch);
    let lazy = vmm::snapshot::LazySnapshot::open(scratch);
    if let (Ok((state, _ram, stats)), lazy) = (&eager, &lazy) {
        // The eager reader checks everything the lazy one does, and the page data.
        let lazy = lazy
            .as_ref()
            .expect("eager read accepted what lazy open refused");
        assert_eq!(lazy.memory, stats.memory);
        assert_eq!(lazy.data_pages, stats.data_pages);
        assert_eq!(lazy.state.memory, state.memory);
        lazy.stream(64, |_, _| Ok(()))
            .expect("the data checksum passed once");
    } else if let Ok(lazy) = &lazy {
        let mut buf = vec![0u8; 4096];
        for &(off, _) in lazy.runs.iter().take(4) {
            let _ = lazy.read_page(off, &mut buf);
        }
        let _ = lazy.stream(16, |_, _| Ok(()));
    }
}

/// Recomputes the header, state, page index, working-set and data checksums of a
/// snapshot-like input wherever its header's sizes say they are (and fit).
pub fn fix_checksums(data: &[u8]) -> Vec<u8> {
    let mut b = data.to_vec();
    if b.len() >= 64 {
        let crc = crc32fast::hash(&b[..56]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
        let _ = fix_sections(&mut b);
    }
    b
}

fn u64_at(b: &[u8], o: usize) -> Option<usize> {
    let v = u64::from_le_bytes(b.get(o..o.checked_add(8)?)?.try_into().ok()?);
    usize::try_from(v).ok()
}

/// Writes the CRC32 of `b[from..to]` at `to`, if it all fits.
fn put_crc(b: &mut [u8], from: usize, to: usize) -> Option<()> {
    let crc = crc32fast::hash(b.get(from..to)?);
    b.get_mut(to..to.checked_add(4)?)?
        .copy_from_slice(&crc.to_le_bytes());
    Some(())
}

fn fix_sections(b: &mut [u8]) -> Option<()> {
    let state_len = u64_at(b, 24)?;
    let runs = u64_at(b, 32)?;
    let flags = u32::from_le_bytes(b.get(52..56)?.try_into().ok()?);
    let state_end = 64usize.checked_add(state_len)?;
    put_crc(b, 64, state_end)?;
    let index = state_end.checked_add(4)?;
    let index_end = index.checked_add(runs.checked_mul(16)?)?;
    put_crc(b, index, index_end)?;
    let mut data_start = index_end.checked_add(4)?;
    if flags & vmm::snapshot::FLAG_WORKING_SET != 0 {
        let count = u64_at(b, data_start)?;
        let ws_end = data_start
            .checked_add(8)?
            .checked_add(count.checked_mul(8)?)?;
        put_crc(b, data_start, ws_end)?;
        data_start = ws_end.checked_add(4)?;
    }
    if flags & vmm::snapshot::FLAG_BOOT != 0 {
        let len = u32::from_le_bytes(
            b.get(data_start..data_start.checked_add(4)?)?
                .try_into()
                .ok()?,
        );
        let boot_end = data_start.checked_add(4)?.checked_add(len as usize)?;
        put_crc(b, data_start, boot_end)?;
        data_start = boot_end.checked_add(4)?;
    }
    if flags & vmm::snapshot::FLAG_ALIGNED_DATA != 0 {
        data_start = data_start.checked_next_multiple_of(4096)?;
    }
    let trailer = b.len().checked_sub(12)?;
    if data_start <= trailer {
        put_crc(b, data_start, trailer)?;
    }
    Some(())
}

/// `config_parse`: a daemon config file; its errors are one line, as the daemon
/// prints them.
pub fn config_parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match migd::config_file::parse(&text) {
        Ok(f) => {
            for a in [&f.listen, &f.metrics_listen].into_iter().flatten() {
                assert!(migd::config_file::check_host_port(a).is_ok());
            }
        }
        Err(e) => assert!(!e.contains('\n'), "error of more than one line: {e:?}"),
    }
}

/// Where `snapshot_read` writes its file: tmpfs when there is one.
pub fn scratch_file(tag: &str) -> std::path::PathBuf {
    let dir = Path::new("/dev/shm");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("migd-fuzz-{tag}-{}", std::process::id()))
}
