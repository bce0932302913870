//! Memory sizes as operators write them: `512M`, `1G`, `1.5G`, `4096B` (bytes), `64` (MiB, as QEMU's -m).

/// Parses a size; a bare number is MiB, a bare `B` bytes. Suffixes K, M, G, T (binary),
/// optionally followed by `iB`/`B`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let not_a_size = || format!("'{s}' is not a size (examples: 512M, 1G, 4096B, 4096 = MiB)");
    let (body, unit_required) = match lower.strip_suffix("ib") {
        Some(b) => (b, true),
        None => match lower.strip_suffix('b') {
            Some(b) => (b, false),
            None => (lower.as_str(), false),
        },
    };
    let bytes_suffix = body.len() < lower.len();
    let (num, mult) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1u64 << 10),
        Some('m') => (&body[..body.len() - 1], 1 << 20),
        Some('g') => (&body[..body.len() - 1], 1 << 30),
        Some('t') => (&body[..body.len() - 1], 1 << 40),
        // "iB" needs a unit letter before it; a bare "B" means bytes.
        _ if unit_required => return Err(not_a_size()),
        _ if bytes_suffix => (body, 1),
        _ => (body, 1 << 20),
    };
    let value: f64 = num.parse().map_err(|_| not_a_size())?;
    if !value.is_finite() || value < 0.0 || value * mult as f64 > (1u64 << 50) as f64 {
        return Err(format!("'{s}' is out of range"));
    }
    Ok((value * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("256").unwrap(), 256 << 20);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999T").is_err());
    }

    #[test]
    fn bare_b_is_bytes() {
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        assert_eq!(parse_size("4096b").unwrap(), 4096);
        assert_eq!(parse_size("125000000B").unwrap(), 125_000_000);
        assert_eq!(parse_size("0B").unwrap(), 0);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("1GB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4KB").unwrap(), 4 << 10);
        assert!(parse_size("4096iB").is_err());
        assert!(parse_size("B").is_err());
    }
}
