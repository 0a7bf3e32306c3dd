//! The head anchor: the last committed sequence and hash, MAC'd under the
//! audit key, in a small file beside the SQLite database
//! (`<database>.anchor`); the PostgreSQL backend keeps the same MAC in a row
//! it moves in every batch's transaction.
//!
//! The chain alone shows an edited, deleted or reordered event, but not a
//! log cut short at the end: the remaining prefix is a valid chain. The
//! anchor names a head the log must still reach, so the offline verifier
//! and the next start see a truncated tail (or a database restored from an
//! older copy) as missing events.
//!
//! The writer refreshes the anchor at most once per [`ANCHOR_INTERVAL`]
//! after a commit and when the log closes, so the events of the last
//! interval before a crash are not covered. Someone who can replace both
//! files with an older consistent pair is not detected: only a copy kept
//! elsewhere (the SIEM export, `TailEvents`) covers that.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::{AuditError, AuditKey};

/// Longest time between a commit and the anchor naming it (while the service runs).
pub(crate) const ANCHOR_INTERVAL: Duration = Duration::from_secs(1);

const MAGIC: &str = "recvault-audit-anchor-v1";

/// A committed head, as the anchor file records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Anchor {
    pub sequence: u64,
    pub hash: [u8; 32],
}

/// `<database>.anchor`.
pub(crate) fn path_for(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".anchor");
    PathBuf::from(name)
}

fn mac(key: &AuditKey, sequence: u64, hash: &[u8; 32]) -> Hmac<Sha256> {
    // Keys of any length are accepted by HMAC; the audit key is 32 bytes.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(MAGIC.as_bytes());
    mac.update(&[0]);
    mac.update(&sequence.to_be_bytes());
    mac.update(hash);
    mac
}

/// The anchor's MAC, for a backend that keeps the anchor as a row.
pub(crate) fn tag(key: &AuditKey, anchor: Anchor) -> Vec<u8> {
    mac(key, anchor.sequence, &anchor.hash)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Whether `tag` authenticates `anchor` (constant time).
pub(crate) fn authentic(key: &AuditKey, anchor: Anchor, tag: &[u8]) -> bool {
    mac(key, anchor.sequence, &anchor.hash)
        .verify_slice(tag)
        .is_ok()
}

/// Reads and authenticates the anchor; `None` if there is no anchor file.
pub(crate) fn read(database: &Path, key: &AuditKey) -> Result<Option<Anchor>, AuditError> {
    let path = path_for(database);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(AuditError::Unavailable {
                reason: format!("cannot read the audit anchor {}: {e}", path.display()),
            });
        }
    };
    let forged = |what: &str| AuditError::Tampered {
        sequence: 0,
        reason: format!(
            "the anchor file {} {what} (edited, or written with another audit key)",
            path.display()
        ),
    };
    let mut fields = text.split_whitespace();
    if fields.next() != Some(MAGIC) {
        return Err(forged("is not an audit anchor"));
    }
    let mut value = |name: &str| {
        fields
            .next()
            .and_then(|f| f.strip_prefix(name))
            .and_then(|f| f.strip_prefix('='))
            .ok_or_else(|| forged(&format!("has no {name}")))
    };
    let sequence: u64 = value("sequence")?
        .parse()
        .map_err(|_| forged("has an unreadable sequence"))?;
    let hash: [u8; 32] = hex::decode(value("hash")?)
        .ok()
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| forged("has an unreadable hash"))?;
    let tag = hex::decode(value("mac")?).map_err(|_| forged("has an unreadable MAC"))?;
    mac(key, sequence, &hash)
        .verify_slice(&tag)
        .map_err(|_| forged("does not authenticate"))?;
    Ok(Some(Anchor { sequence, hash }))
}

/// Replaces the anchor atomically and durably: temp file, fsync, rename,
/// directory fsync.
pub(crate) fn write(database: &Path, key: &AuditKey, anchor: Anchor) -> std::io::Result<()> {
    let path = path_for(database);
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let tag = mac(key, anchor.sequence, &anchor.hash)
        .finalize()
        .into_bytes();
    let line = format!(
        "{MAGIC} sequence={} hash={} mac={}\n",
        anchor.sequence,
        hex::encode(anchor.hash),
        hex::encode(tag)
    );
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(line.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, &path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use recvault_runtime::secret::SecretBytes;

    use super::*;

    fn key(byte: u8) -> AuditKey {
        AuditKey::new(SecretBytes::new(vec![byte; AuditKey::LEN])).unwrap()
    }

    #[test]
    fn round_trip_and_forgery() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        assert_eq!(read(&db, &key(1)).unwrap(), None);
        let anchor = Anchor {
            sequence: 42,
            hash: [7; 32],
        };
        write(&db, &key(1), anchor).unwrap();
        assert_eq!(read(&db, &key(1)).unwrap(), Some(anchor));
        // Another key, or an edited sequence, does not authenticate.
        assert!(matches!(
            read(&db, &key(2)),
            Err(AuditError::Tampered { .. })
        ));
        let text = std::fs::read_to_string(path_for(&db)).unwrap();
        std::fs::write(path_for(&db), text.replace("sequence=42", "sequence=41")).unwrap();
        assert!(matches!(
            read(&db, &key(1)),
            Err(AuditError::Tampered { .. })
        ));
        std::fs::write(path_for(&db), "garbage\n").unwrap();
        assert!(matches!(
            read(&db, &key(1)),
            Err(AuditError::Tampered { .. })
        ));
    }
}
