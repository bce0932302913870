//! TLS 1.3 application-data records with the keys taken from a rustls session
//! (RFC 8446 §5.2): header `17 03 03 len`, AEAD-sealed `data ‖ 17`, nonce =
//! IV XOR the record's sequence number, the header as additional data.

use std::io::{self, IoSlice, Read, Write};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};

/// Largest plaintext per record (TLS's limit).
pub(crate) const MAX_PLAIN: usize = 1 << 14;
/// Records sealed per write call at most (one syscall for up to 256 KiB).
const RECORDS_PER_WRITE: usize = 16;
/// AES-GCM is safe for 2^24.5 records per key (RFC 8446 §5.5); we stop at 2^24
/// (256 GiB per direction) rather than implement key updates.
const MAX_RECORDS: u64 = 1 << 24;
const CONTENT_DATA: u8 = 0x17;
const CONTENT_ALERT: u8 = 0x15;
const TAG_LEN: usize = 16;

/// The AEAD of a session: 0 AES-128-GCM, 1 AES-256-GCM, 2 ChaCha20-Poly1305.
fn algorithm(suite: u8) -> Option<&'static aead::Algorithm> {
    match suite {
        0 => Some(&aead::AES_128_GCM),
        1 => Some(&aead::AES_256_GCM),
        2 => Some(&aead::CHACHA20_POLY1305),
        _ => None,
    }
}

/// One direction's key, IV and record sequence number.
struct Keys {
    suite: u8,
    raw: Vec<u8>,
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new(suite: u8, key: &[u8], iv: &[u8], seq: u64) -> Result<Keys, String> {
        let alg = algorithm(suite).ok_or_else(|| format!("unknown cipher suite {suite}"))?;
        let unbound = UnboundKey::new(alg, key).map_err(|_| "bad key length".to_string())?;
        let iv: [u8; NONCE_LEN] = iv.try_into().map_err(|_| "bad IV length".to_string())?;
        Ok(Keys {
            suite,
            raw: key.to_vec(),
            key: LessSafeKey::new(unbound),
            iv,
            seq,
        })
    }

    fn nonce(&mut self) -> io::Result<Nonce> {
        if self.seq >= MAX_RECORDS {
            return Err(io::Error::other(
                "TLS record limit of this session reached (2^24 records); reconnect",
            ));
        }
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }

    fn export(&self, out: &mut Vec<u8>) {
        out.push(self.suite);
        out.push(self.raw.len() as u8);
        out.extend_from_slice(&self.raw);
        out.extend_from_slice(&self.iv);
        out.extend_from_slice(&self.seq.to_le_bytes());
    }

    fn import(b: &mut &[u8]) -> Result<Keys, String> {
        let mut take = |n: usize| -> Result<Vec<u8>, String> {
            if b.len() < n {
                return Err("truncated link state".into());
            }
            let (h, t) = b.split_at(n);
            *b = t;
            Ok(h.to_vec())
        };
        let head = take(2)?;
        let key = take(head[1] as usize)?;
        let iv = take(NONCE_LEN)?;
        let seq = take(8)?;
        let seq = u64::from_le_bytes(seq.try_into().map_err(|_| "bad sequence number")?);
        Keys::new(head[0], &key, &iv, seq)
    }
}

/// Seals outgoing records.
pub(crate) struct Sealer {
    keys: Keys,
    buf: Vec<u8>,
}

impl Sealer {
    pub(crate) fn new(suite: u8, key: &[u8], iv: &[u8], seq: u64) -> Result<Sealer, String> {
        Ok(Sealer {
            keys: Keys::new(suite, key, iv, seq)?,
            buf: Vec::new(),
        })
    }

    /// Seals up to [`RECORDS_PER_WRITE`] records of `bufs` and writes them
    /// whole to `w`; returns the plaintext bytes consumed.
    pub(crate) fn write(&mut self, w: &mut impl Write, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.buf.clear();
        let mut consumed = 0;
        let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut cur: &[u8] = slices.next().unwrap_or(&[]);
        for _ in 0..RECORDS_PER_WRITE {
            if cur.is_empty() {
                break;
            }
            // Header placeholder, then up to MAX_PLAIN bytes gathered from the slices.
            let start = self.buf.len();
            self.buf.extend_from_slice(&[CONTENT_DATA, 3, 3, 0, 0]);
            let body = self.buf.len();
            while self.buf.len() - body < MAX_PLAIN && !cur.is_empty() {
                let n = cur.len().min(MAX_PLAIN - (self.buf.len() - body));
                self.buf.extend_from_slice(&cur[..n]);
                cur = &cur[n..];
                consumed += n;
                if cur.is_empty() {
                    cur = slices.next().unwrap_or(&[]);
                }
            }
            self.buf.push(CONTENT_DATA);
            let len = self.buf.len() - body + TAG_LEN;
            self.buf[start + 3..start + 5].copy_from_slice(&(len as u16).to_be_bytes());
            let header: [u8; 5] = self.buf[start..body]
                .try_into()
                .map_err(|_| io::Error::other("record header"))?;
            let nonce = self.keys.nonce()?;
            let tag = self
                .keys
                .key
                .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.buf[body..])
                .map_err(|_| io::Error::other("sealing a TLS record failed"))?;
            self.buf.extend_from_slice(tag.as_ref());
        }
        w.write_all(&self.buf)?;
        Ok(consumed)
    }

    pub(crate) fn export(&self, out: &mut Vec<u8>) {
        self.keys.export(out)
    }

    pub(crate) fn import(b: &mut &[u8]) -> Result<Sealer, String> {
        Ok(Sealer {
            keys: Keys::import(b)?,
            buf: Vec::new(),
        })
    }
}

/// Opens incoming records and buffers their plaintext.
pub(crate) struct Opener {
    keys: Keys,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// A read failed inside a record: the stream is out of step for good.
    broken: Option<String>,
}

impl Opener {
    pub(crate) fn new(suite: u8, key: &[u8], iv: &[u8], seq: u64) -> Result<Opener, String> {
        Ok(Opener {
            keys: Keys::new(suite, key, iv, seq)?,
            buf: vec![0; 5 + MAX_PLAIN + 256],
            pos: 0,
            end: 0,
            broken: None,
        })
    }

    /// Plaintext received and not yet read.
    pub(crate) fn buffered(&self) -> usize {
        self.end - self.pos
    }

    pub(crate) fn read(&mut self, r: &mut impl Read, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.pos == self.end {
            if let Some(why) = &self.broken {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, why.clone()));
            }
            match self.next_record(r) {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => {
                    self.broken = Some(format!("TLS link broken: {e}"));
                    return Err(e);
                }
            }
        }
        let n = out.len().min(self.end - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }

    /// Reads and opens one record; false at a clean end of stream.
    fn next_record(&mut self, r: &mut impl Read) -> io::Result<bool> {
        let mut header = [0u8; 5];
        // A clean EOF is allowed only between records.
        let got = read_full(r, &mut header)?;
        if got == 0 {
            return Ok(false);
        }
        if got < header.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if header[0] != CONTENT_DATA || header[1] != 3 || len < TAG_LEN + 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a TLS application-data record (header {header:02x?})"),
            ));
        }
        if len > MAX_PLAIN + 256 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("TLS record of {len} bytes"),
            ));
        }
        let body = &mut self.buf[..len];
        r.read_exact(body)?;
        let nonce = self.keys.nonce()?;
        let plain = self
            .keys
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS record failed authentication (tampered or out of step)",
                )
            })?;
        // Strip padding; the last non-zero byte is the real content type.
        let Some(typ_at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "empty TLS record",
            ));
        };
        match plain[typ_at] {
            CONTENT_DATA => {
                self.pos = 0;
                self.end = typ_at;
                Ok(true)
            }
            CONTENT_ALERT if typ_at >= 2 && plain[1] == 0 => Ok(false), // close_notify
            CONTENT_ALERT => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!(
                    "the peer ended the TLS session: {}",
                    alert_name(plain.get(1).copied().unwrap_or(0))
                ),
            )),
            t => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected TLS content type {t} after the handshake"),
            )),
        }
    }

    pub(crate) fn export(&self, out: &mut Vec<u8>) {
        self.keys.export(out)
    }

    pub(crate) fn import(b: &mut &[u8]) -> Result<Opener, String> {
        let keys = Keys::import(b)?;
        Ok(Opener {
            keys,
            buf: vec![0; 5 + MAX_PLAIN + 256],
            pos: 0,
            end: 0,
            broken: None,
        })
    }
}

/// The TLS alerts a migration peer sends after the handshake (a rejected
/// client certificate shows up here on the client in TLS 1.3).
fn alert_name(code: u8) -> String {
    match code {
        40 => "handshake failure".into(),
        42 => "bad certificate (ours was rejected)".into(),
        44 => "certificate revoked".into(),
        45 => "certificate expired (ours)".into(),
        46 => "certificate unknown (ours was rejected)".into(),
        48 => "unknown CA (our certificate is not from the peer's CA)".into(),
        116 => "certificate required".into(),
        c => format!("alert {c}"),
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(suite: u8) -> (Sealer, Opener) {
        let key = vec![7u8; if suite == 0 { 16 } else { 32 }];
        let iv = [9u8; 12];
        (
            Sealer::new(suite, &key, &iv, 5).unwrap(),
            Opener::new(suite, &key, &iv, 5).unwrap(),
        )
    }

    #[test]
    fn records_round_trip_across_sizes_and_slices() {
        for suite in 0..3 {
            let (mut s, mut o) = pair(suite);
            let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
            let mut wire = Vec::new();
            let mut off = 0;
            while off < data.len() {
                let a = &data[off..(off + 1000).min(data.len())];
                let b = &data[(off + 1000).min(data.len())..];
                off += s
                    .write(&mut wire, &[IoSlice::new(a), IoSlice::new(b)])
                    .unwrap();
            }
            let mut r = &wire[..];
            let mut got = Vec::new();
            let mut buf = [0u8; 7000];
            loop {
                let n = o.read(&mut r, &mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, data, "suite {suite}");
        }
    }

    #[test]
    fn tampering_and_truncation_are_errors_not_panics() {
        let (mut s, mut o) = pair(0);
        let mut wire = Vec::new();
        s.write(&mut wire, &[IoSlice::new(b"hello migration")])
            .unwrap();
        let mut bad = wire.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let mut buf = [0u8; 64];
        let e = o.read(&mut &bad[..], &mut buf).unwrap_err();
        assert!(e.to_string().contains("authentication"), "{e}");
        // Once out of step, it stays broken.
        assert!(o.read(&mut &wire[..], &mut buf).is_err());
        let (_, mut o) = pair(0);
        let e = o.read(&mut &wire[..wire.len() - 3], &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let (_, mut o) = pair(0);
        let e = o
            .read(&mut &b"\x00\x00\x01\x00garbage"[..], &mut buf)
            .unwrap_err();
        assert!(e.to_string().contains("not a TLS"), "{e}");
    }

    #[test]
    fn export_and_import_keep_the_sequence() {
        let (mut s, mut o) = pair(1);
        let mut wire = Vec::new();
        s.write(&mut wire, &[IoSlice::new(b"one")]).unwrap();
        let mut st = Vec::new();
        s.export(&mut st);
        let mut s2 = Sealer::import(&mut &st[..]).unwrap();
        s2.write(&mut wire, &[IoSlice::new(b"two")]).unwrap();
        let mut buf = [0u8; 8];
        let mut r = &wire[..];
        let n = o.read(&mut r, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"one");
        let n = o.read(&mut r, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"two");
        assert!(Sealer::import(&mut &st[..5]).is_err());
    }
}
