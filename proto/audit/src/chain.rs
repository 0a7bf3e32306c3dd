//! The hash chain: how an event's HMAC is computed, and how a stream of
//! stored rows is checked against it. Pure functions; no I/O.
//!
//! The HMAC input of one event (HMAC-SHA-256, RFC 2104), every `field(x)`
//! being `u32be(len(x)) ‖ x`:
//!
//! ```text
//! "recvault.audit.v1" ‖ prev_hash (32) ‖ u64be(sequence)
//!   ‖ field(i64be(time_unix_nanos))
//!   ‖ field(identity) ‖ field(cert_fingerprint) ‖ field(operation)
//!   ‖ field(tenant_id) ‖ field(credential_id) ‖ field(lease_id)
//!   ‖ field(outcome) ‖ field(code) ‖ field(request_id) ‖ field(detail)
//!   [ ‖ "recvault.audit.v1.ext.recording"
//!     ‖ field(job_id) ‖ field(recording_id) ‖ field(destination_id) ]
//!   [ ‖ "recvault.audit.v1.ext.instance" ‖ field(instance_id) ]
//! ```
//!
//! The bracketed extension block (schema v2, for the uploader's recording
//! events) is appended only when at least one of its three fields is
//! non-empty. So an event without them, which is every vault event, hashes
//! byte for byte as before the block existed, and logs written before it
//! still verify. It stays unambiguous: every field before it is
//! length-prefixed, so the v1 input ends at a fixed, parseable point, and an
//! input with the block is a strict extension of one without it that no v1
//! input can equal (the tag marks which block follows, for any later one).
//! Blanking the three columns of an uploader event removes the block and
//! breaks the hash, like any other edit.
//!
//! The second block (schema v3) names the replica that wrote the event, on
//! a log several replicas share; it follows the same rule (present only
//! when `instance_id` is non-empty, so a single-writer log hashes as before).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{AuditKey, store::StoredRow};

/// Separates audit HMACs from every other use of the same key.
const DOMAIN: &[u8] = b"recvault.audit.v1";

/// Starts the extension block of job, recording and destination ids.
const RECORDING_EXTENSION: &[u8] = b"recvault.audit.v1.ext.recording";

/// Starts the extension block of the writing replica's instance id.
const INSTANCE_EXTENSION: &[u8] = b"recvault.audit.v1.ext.instance";

/// Hash of the (absent) event before sequence 1.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// The hashed content of one event, in chain order. Records, stored rows and
/// the verifier all hash through this one type so they cannot disagree.
pub(crate) struct HashInput<'a> {
    pub time_unix_nanos: i64,
    /// identity, cert_fingerprint, operation, tenant_id, credential_id,
    /// lease_id, outcome, code, request_id, detail — in this order, forever.
    pub fields: [&'a str; 10],
    /// job_id, recording_id, destination_id: the extension block, hashed
    /// only when any is non-empty (see the module documentation).
    pub recording: [&'a str; 3],
    /// The writing replica's instance id: the second extension block,
    /// hashed only when non-empty.
    pub instance: &'a str,
}

/// `HMAC-SHA-256(key, DOMAIN ‖ prev_hash ‖ u64be(sequence) ‖ field* [‖ extension])`,
/// every field as `u32be(len) ‖ bytes` so that no two records share an
/// encoding; the layout is in the module documentation.
pub(crate) fn event_hash(
    key: &AuditKey,
    prev_hash: &[u8; 32],
    sequence: u64,
    input: &HashInput<'_>,
) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose())
        .expect("HMAC accepts keys of any length");
    mac.update(DOMAIN);
    mac.update(prev_hash);
    mac.update(&sequence.to_be_bytes());
    put_field(&mut mac, &input.time_unix_nanos.to_be_bytes());
    for field in input.fields {
        put_field(&mut mac, field.as_bytes());
    }
    if input.recording.iter().any(|f| !f.is_empty()) {
        mac.update(RECORDING_EXTENSION);
        for field in input.recording {
            put_field(&mut mac, field.as_bytes());
        }
    }
    if !input.instance.is_empty() {
        mac.update(INSTANCE_EXTENSION);
        put_field(&mut mac, input.instance.as_bytes());
    }
    mac.finalize().into_bytes().into()
}

fn put_field(mac: &mut Hmac<Sha256>, bytes: &[u8]) {
    // Fields are capped far below 4 GiB when a record is accepted.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    mac.update(&len.to_be_bytes());
    mac.update(bytes);
}

/// Where and why the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Broken {
    pub sequence: u64,
    pub reason: String,
}

/// Walks stored rows in ascending sequence order.
///
/// Rule for the reported sequence: the first *expected* sequence number whose
/// event is missing, out of place, edited, or not linked to its predecessor.
/// A deleted event N is therefore reported as N; two swapped events as the
/// lower of the two; an edited event (any column, hash included) as itself.
pub(crate) struct ChainVerifier<'k> {
    key: &'k AuditKey,
    next_sequence: u64,
    prev_hash: [u8; 32],
    /// A head this process committed; the file must still contain it.
    expected_head: Option<(u64, [u8; 32])>,
}

impl<'k> ChainVerifier<'k> {
    pub fn new(key: &'k AuditKey, expected_head: Option<(u64, [u8; 32])>) -> Self {
        Self {
            key,
            next_sequence: 1,
            prev_hash: GENESIS_HASH,
            expected_head: expected_head.filter(|(seq, _)| *seq > 0),
        }
    }

    /// Events accepted so far.
    pub fn checked(&self) -> u64 {
        self.next_sequence - 1
    }

    /// A row whose sequence is known but whose other columns do not decode.
    pub fn undecodable(&self, sequence: i64, reason: &str) -> Broken {
        match self.position(sequence) {
            Err(broken) => broken,
            Ok(()) => self.broken(format!("row cannot be decoded: {reason}")),
        }
    }

    pub fn check(&mut self, row: &StoredRow) -> Result<(), Broken> {
        self.position(row.sequence)?;
        let (Ok(prev_hash), Ok(hash)) = (
            <[u8; 32]>::try_from(row.prev_hash.as_slice()),
            <[u8; 32]>::try_from(row.hash.as_slice()),
        ) else {
            return Err(self.broken("stored hash is not 32 bytes".into()));
        };
        if !bool::from(prev_hash.ct_eq(&self.prev_hash)) {
            return Err(self.broken(format!(
                "prev_hash does not match the hash of event {}",
                self.next_sequence - 1
            )));
        }
        let computed = event_hash(self.key, &prev_hash, self.next_sequence, &row.hash_input());
        if !bool::from(computed.ct_eq(&hash)) {
            return Err(self.broken(
                "hash does not match the event's contents (edited, forged, or wrong audit key)"
                    .into(),
            ));
        }
        if let Some((head_seq, head_hash)) = self.expected_head
            && head_seq == self.next_sequence
            && !bool::from(head_hash.ct_eq(&hash))
        {
            return Err(self.broken("differs from the event this process committed".into()));
        }
        self.prev_hash = hash;
        self.next_sequence += 1;
        Ok(())
    }

    /// Called after the last row: detects a truncated (or rolled back) file.
    pub fn finish(&self) -> Result<(), Broken> {
        match self.expected_head {
            Some((head_seq, _)) if head_seq >= self.next_sequence => Err(self.broken(format!(
                "events {}..={head_seq} were committed but are missing (log truncated or restored from an older copy)",
                self.next_sequence
            ))),
            _ => Ok(()),
        }
    }

    fn position(&self, sequence: i64) -> Result<(), Broken> {
        if u64::try_from(sequence) == Ok(self.next_sequence) {
            return Ok(());
        }
        Err(self.broken(format!(
            "event {} is missing or out of place (next stored sequence is {sequence})",
            self.next_sequence
        )))
    }

    fn broken(&self, reason: String) -> Broken {
        Broken {
            sequence: self.next_sequence,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use recvault_runtime::secret::SecretBytes;

    use super::*;

    fn key() -> AuditKey {
        AuditKey::new(SecretBytes::from_slice(&[0x42; 32])).unwrap()
    }

    fn input<'a>(fields: [&'a str; 10]) -> HashInput<'a> {
        HashInput {
            time_unix_nanos: 1_700_000_000_123_456_789,
            fields,
            recording: ["", "", ""],
            instance: "",
        }
    }

    fn with_recording<'a>(fields: [&'a str; 10], recording: [&'a str; 3]) -> HashInput<'a> {
        HashInput {
            recording,
            ..input(fields)
        }
    }

    const FIELDS: [&str; 10] = [
        "spiffe://recvault.local/uploader",
        "ab",
        "recvault.vault.v1.Leases/AcquireLease",
        "t1",
        "c1",
        "l1",
        "allowed",
        "OK",
        "r1",
        "rec-1",
    ];

    /// Pins the hash layout: changing it orphans every stored chain. The value
    /// was cross-checked with Python's `hmac` over the documented encoding.
    #[test]
    fn known_answer() {
        let hash = event_hash(&key(), &GENESIS_HASH, 1, &input(FIELDS));
        assert_eq!(hex::encode(hash), PINNED);
    }
    const PINNED: &str = "2db23df25fdb7f58d15e835e38d87ad88c36e284d29b33aa6caaf01a91576ae7";

    #[test]
    fn every_input_is_bound() {
        let base = event_hash(&key(), &GENESIS_HASH, 1, &input(FIELDS));
        assert_ne!(base, event_hash(&key(), &[1; 32], 1, &input(FIELDS)));
        assert_ne!(base, event_hash(&key(), &GENESIS_HASH, 2, &input(FIELDS)));
        let mut later = input(FIELDS);
        later.time_unix_nanos += 1;
        assert_ne!(base, event_hash(&key(), &GENESIS_HASH, 1, &later));
        for i in 0..FIELDS.len() {
            let mut fields = FIELDS;
            fields[i] = "x";
            assert_ne!(
                base,
                event_hash(&key(), &GENESIS_HASH, 1, &input(fields)),
                "field {i}"
            );
        }
    }

    /// Length prefixes: moving bytes between adjacent fields changes the hash.
    #[test]
    fn field_boundaries_are_unambiguous() {
        let mut a = FIELDS;
        let mut b = FIELDS;
        (a[3], a[4]) = ("t1c", "1");
        (b[3], b[4]) = ("t1", "c1");
        assert_ne!(
            event_hash(&key(), &GENESIS_HASH, 1, &input(a)),
            event_hash(&key(), &GENESIS_HASH, 1, &input(b))
        );
    }

    const RECORDING: [&str; 3] = ["job-1", "rec-1", "dst-1"];

    /// No extension block when all three are empty: the v1 layout, unchanged.
    /// (Full-record known answers, extension included, are the data file
    /// `tests/data/chain_vectors.json`, run by `tests/chain_vectors.rs`.)
    #[test]
    fn empty_extension_hashes_as_v1() {
        let hash = event_hash(
            &key(),
            &GENESIS_HASH,
            1,
            &with_recording(FIELDS, ["", "", ""]),
        );
        assert_eq!(hex::encode(hash), PINNED);
    }

    #[test]
    fn every_extension_field_is_bound() {
        let base = event_hash(&key(), &GENESIS_HASH, 1, &with_recording(FIELDS, RECORDING));
        assert_ne!(base, event_hash(&key(), &GENESIS_HASH, 1, &input(FIELDS)));
        for i in 0..RECORDING.len() {
            let mut recording = RECORDING;
            recording[i] = "x";
            assert_ne!(
                base,
                event_hash(&key(), &GENESIS_HASH, 1, &with_recording(FIELDS, recording)),
                "extension field {i}"
            );
            // Each one alone also adds the block (and says which it is).
            let mut alone = ["", "", ""];
            alone[i] = "x";
            let mut other = ["", "", ""];
            other[(i + 1) % 3] = "x";
            assert_ne!(
                event_hash(&key(), &GENESIS_HASH, 1, &with_recording(FIELDS, alone)),
                event_hash(&key(), &GENESIS_HASH, 1, &with_recording(FIELDS, other)),
                "extension field {i} alone"
            );
        }
    }

    /// The instance block: absent when empty (v1 layout), bound when present,
    /// and not confusable with the recording block.
    #[test]
    fn instance_extension_is_bound_and_optional() {
        let plain = event_hash(&key(), &GENESIS_HASH, 1, &input(FIELDS));
        let mut a = input(FIELDS);
        a.instance = "vault-0";
        let mut b = input(FIELDS);
        b.instance = "vault-1";
        let (ha, hb) = (
            event_hash(&key(), &GENESIS_HASH, 1, &a),
            event_hash(&key(), &GENESIS_HASH, 1, &b),
        );
        assert_ne!(plain, ha);
        assert_ne!(ha, hb);
        let as_job = with_recording(FIELDS, ["vault-0", "", ""]);
        assert_ne!(ha, event_hash(&key(), &GENESIS_HASH, 1, &as_job));
    }

    /// Bytes moved from `detail` into the block, or between its fields, change the hash.
    #[test]
    fn extension_boundaries_are_unambiguous() {
        let mut longer = FIELDS;
        longer[9] = "rec-1job-1";
        assert_ne!(
            event_hash(
                &key(),
                &GENESIS_HASH,
                1,
                &with_recording(FIELDS, ["job-1", "", ""])
            ),
            event_hash(&key(), &GENESIS_HASH, 1, &input(longer))
        );
        assert_ne!(
            event_hash(
                &key(),
                &GENESIS_HASH,
                1,
                &with_recording(FIELDS, ["job-1r", "ec-1", ""])
            ),
            event_hash(
                &key(),
                &GENESIS_HASH,
                1,
                &with_recording(FIELDS, ["job-1", "rec-1", ""])
            )
        );
    }
}
