//! Reads a live process's memory through `/proc/PID/mem` and counts copies
//! of a secret in it: raw, JSON-escaped and base64 at each of the three byte
//! alignments. For the memory test of the real binaries; needs root (or
//! `CAP_SYS_PTRACE`), since both daemons make themselves non-dumpable.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use base64::Engine as _;

/// Why memory cannot be read here, or `None` when it can (effective uid 0).
pub fn unavailable() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_owned);
    match euid.as_deref() {
        Some("0") => None,
        Some(uid) => Some(format!(
            "reading another process's memory through /proc/PID/mem needs root; this test runs as uid {uid}"
        )),
        None => Some("/proc/self/status shows no Uid line".into()),
    }
}

/// The forms a secret can take in memory: the bytes themselves, JSON-escaped
/// (when that differs), and the base64 of the secret at each of the three
/// offsets it can start at within a base64 group (the stable inner part, so
/// it is found inside a longer encoded message).
pub fn needles(secret: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![("raw".to_owned(), secret.as_bytes().to_vec())];
    let json = serde_json::to_string(secret).unwrap_or_default();
    let json = json.trim_matches('"');
    if json != secret {
        out.push(("json".to_owned(), json.as_bytes().to_vec()));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    for pad in 0..3usize {
        let mut shifted = vec![0u8; pad];
        shifted.extend_from_slice(secret.as_bytes());
        let encoded = b64.encode(&shifted);
        // Characters that depend only on the secret's bytes: skip the group
        // holding the padding bytes and the last, possibly partial, group.
        let start = if pad == 0 { 0 } else { 4 };
        let end = (encoded.len() / 4).saturating_sub(1) * 4;
        if end > start + 8 {
            out.push((
                format!("base64+{pad}"),
                encoded.as_bytes()[start..end].to_vec(),
            ));
        }
    }
    out
}

/// One copy found: which form, at which address, in which mapping.
#[derive(Debug, Clone)]
pub struct Hit {
    pub form: String,
    pub address: u64,
    pub mapping: String,
}

/// Every copy of every needle in the readable mappings of `pid`.
/// Mappings that cannot be read (guard pages, `[vvar]`) are skipped.
pub fn scan(pid: u32, needles: &[(String, Vec<u8>)]) -> io::Result<(Vec<Hit>, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mem = File::open(format!("/proc/{pid}/mem"))?;
    let finders: Vec<_> = needles
        .iter()
        .map(|(form, bytes)| (form, memchr::memmem::Finder::new(bytes)))
        .collect();
    let (mut hits, mut scanned) = (Vec::new(), 0u64);
    let mut buf = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let mapping = fields.nth(3).unwrap_or("[anonymous]").to_owned();
        if !perms.starts_with('r') || mapping == "[vvar]" || mapping == "[vsyscall]" {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let Ok(len) = usize::try_from(end - start) else {
            continue;
        };
        buf.resize(len, 0);
        if mem.read_exact_at(&mut buf, start).is_err() {
            continue;
        }
        scanned += end - start;
        for (form, finder) in &finders {
            for offset in finder.find_iter(&buf) {
                hits.push(Hit {
                    form: (*form).clone(),
                    address: start + offset as u64,
                    mapping: mapping.clone(),
                });
            }
        }
    }
    Ok((hits, scanned))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn base64_needles_are_found_in_any_alignment() {
        let secret = "MARKER-0123456789abcdef0123456789abcdef";
        let found = |text: &str| {
            needles(secret)
                .iter()
                .any(|(_, n)| memchr::memmem::find(text.as_bytes(), n).is_some())
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        for prefix in ["", "a", "ab", "abc", "{\"k\":\""] {
            let encoded = b64.encode(format!("{prefix}{secret}\"}}"));
            assert!(found(&encoded), "{prefix:?}: {encoded}");
        }
        assert!(found(&format!("xx{secret}yy")));
        assert!(!found("MARKER-0123456789abcdef"));
    }

    #[test]
    fn finds_a_secret_in_this_process() {
        if let Some(why) = unavailable() {
            eprintln!("skipped: {why}");
            return;
        }
        let secret = format!("SELFSCAN-{:032x}", std::process::id() as u128 * 7919);
        let kept = std::hint::black_box(secret.clone().into_bytes());
        let (hits, scanned) = scan(std::process::id(), &needles(&secret)).unwrap();
        assert!(scanned > 0);
        assert!(
            hits.iter().filter(|h| h.form == "raw").count() >= 1,
            "{hits:?}"
        );
        drop(kept);
    }
}
