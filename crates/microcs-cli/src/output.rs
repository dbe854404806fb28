//! Output helpers: the shared context, JSON on stdout, tables, and human-friendly numbers.

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::error::CliResult;
use crate::net::Net;

/// What every command gets from the global options.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// `--json`: machine-readable output.
    pub json: bool,
    /// The runtime directory to use (from `--runtime-dir`, else the environment).
    pub dir: PathBuf,
}

impl Ctx {
    /// A client builder for `name` in this context's runtime directory, reaching it as `net`
    /// says (local first, else NATS, unless told otherwise).
    pub fn client(&self, name: &str, timeout: Duration, net: &Net) -> microcs::ClientBuilder {
        net.apply(microcs::Client::builder(name).runtime_dir(&self.dir).timeout(timeout))
    }
}

/// The client asks for shared memory when `--shm` was given (else the library's default:
/// `$MICROCS_SHM`, else off).
pub fn shm(builder: microcs::ClientBuilder, on: bool) -> microcs::ClientBuilder {
    if on { builder.shared_memory(true) } else { builder }
}

/// `"local"` or `"nats"`: where a client's requests went, for output.
pub fn via(client: &microcs::Client) -> &'static str {
    client.via().as_str()
}

/// Writes one compact JSON document and a newline on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> CliResult {
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// Writes text on stdout (no newline added).
pub fn print(text: &str) -> CliResult {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Formats rows as left-aligned columns separated by two spaces; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, cell) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, c) in cells.enumerate() {
            if i + 1 < cols {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            } else {
                s.push_str(c);
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

/// A short human duration for uptimes: `42s`, `3m05s`, `2h07m`, `5d03h`.
pub fn uptime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A latency with a unit that keeps three significant digits: `850ns`, `12.3µs`, `4.56ms`, `1.20s`.
pub fn latency(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e6 {
        sig3(ns / 1e3, "µs")
    } else if ns < 1e9 {
        sig3(ns / 1e6, "ms")
    } else {
        sig3(ns / 1e9, "s")
    }
}

fn sig3(v: f64, unit: &str) -> String {
    if v < 10.0 {
        format!("{v:.2}{unit}")
    } else if v < 100.0 {
        format!("{v:.1}{unit}")
    } else {
        format!("{v:.0}{unit}")
    }
}

/// A count with thousands separators: `1,234,567`.
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A byte rate: `512 B/s`, `3.4 MiB/s`.
pub fn byte_rate(bytes_per_s: f64) -> String {
    const UNITS: [&str; 4] = ["B/s", "KiB/s", "MiB/s", "GiB/s"];
    let mut v = bytes_per_s;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{v:.0} {}", UNITS[0]) } else { format!("{v:.1} {}", UNITS[i]) }
}

/// Standard base64 (RFC 4648, with padding), for reply bytes that are not UTF-8 in JSON output.
pub fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (raw, enc) in cases {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
        assert_eq!(base64(&[0xff, 0xfe]), "//4=");
    }

    #[test]
    fn numbers() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(uptime(Duration::from_secs(42)), "42s");
        assert_eq!(uptime(Duration::from_secs(185)), "3m05s");
        assert_eq!(uptime(Duration::from_secs(7620)), "2h07m");
        assert_eq!(uptime(Duration::from_secs(3 * 86_400 + 4 * 3600)), "3d04h");
        assert_eq!(latency(Duration::from_nanos(850)), "850ns");
        assert_eq!(latency(Duration::from_nanos(12_345)), "12.3µs");
        assert_eq!(latency(Duration::from_micros(4_560)), "4.56ms");
        assert_eq!(byte_rate(512.0), "512 B/s");
        assert_eq!(byte_rate(3.5 * 1024.0 * 1024.0), "3.5 MiB/s");
    }

    #[test]
    fn tables_align() {
        let t = table(&["NAME", "PID"], &[vec!["A".into(), "1".into()], vec!["LONGER".into(), "22".into()]]);
        assert_eq!(t, "NAME    PID\nA       1\nLONGER  22\n");
    }
}
