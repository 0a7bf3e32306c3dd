//! The encrypted backup format on real files: nothing of the plaintext is
//! stored, every kind of tampering fails authentication, and the decrypting
//! source returns exactly the ingested bytes for every size and for the
//! ranges a multipart upload asks for.
#![allow(clippy::unwrap_used)]

#[path = "support/keys.rs"]
mod keys;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use recvault_uploader::backup::format::{FIXED_LEN, SEGMENT_SIZE, TAG_LEN};
use recvault_uploader::backup::{BackupStore, StoredBackup};
use recvault_uploader::destination::Source;
use recvault_uploader::digest::Sha256Digest;
use recvault_uploader::jobs::{RecordingId, TenantId};
use tokio::io::AsyncReadExt as _;

const MIB: usize = 1024 * 1024;
const SEG: usize = SEGMENT_SIZE as usize;

struct Fixture {
    _dir: tempfile::TempDir,
    store: BackupStore,
    wrapping: Arc<keys::TestWrapping>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let wrapping = keys::TestWrapping::generate();
    let store = BackupStore::open(dir.path().join("backups"), wrapping.key.clone()).unwrap();
    Fixture {
        _dir: dir,
        store,
        wrapping,
    }
}

fn random(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    getrandom::fill(&mut data).unwrap();
    data
}

impl Fixture {
    /// Writes `data` as recording `recording` in uneven chunks (as ingest would).
    fn write(&self, recording: &str, data: &[u8]) -> StoredBackup {
        let mut w = self
            .store
            .begin(
                &TenantId::parse("acme").unwrap(),
                &RecordingId::parse(recording).unwrap(),
            )
            .unwrap();
        let mut rest = data;
        let mut size = 1usize;
        while !rest.is_empty() {
            let n = size.min(rest.len());
            w.write_chunk(&rest[..n]).unwrap();
            rest = &rest[n..];
            size = size * 7 % 300_007 + 1;
        }
        w.finish(Sha256Digest::of(data)).unwrap()
    }

    async fn read_range(&self, path: &Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let source = self.wrapping.source(&self.store, path).await?;
        let mut out = Vec::new();
        source
            .open_range(offset, len)
            .await?
            .read_to_end(&mut out)
            .await?;
        Ok(out)
    }
}

/// No 64-byte window of a few MiB of random plaintext appears anywhere in
/// the stored file: every 8-byte prefix of the stored file is looked up among
/// the plaintext's (sorted), and each hit is compared in full.
#[tokio::test]
async fn stored_file_holds_no_64_byte_window_of_the_plaintext() {
    let f = fixture();
    let data = random(3 * MIB + 12_345);
    let stored = f.write("rec-window", &data);
    let on_disk = std::fs::read(&stored.path).unwrap();
    assert!(on_disk.len() > data.len(), "segments carry tags");

    let gram = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let mut grams: Vec<(u64, usize)> = (0..=data.len() - 64).map(|i| (gram(&data, i), i)).collect();
    grams.sort_unstable();
    let mut found = Vec::new();
    for at in 0..=on_disk.len() - 64 {
        let g = gram(&on_disk, at);
        let first = grams.partition_point(|(x, _)| *x < g);
        for (_, i) in grams[first..].iter().take_while(|(x, _)| *x == g) {
            if on_disk[at..at + 64] == data[*i..*i + 64] {
                found.push((at, *i));
            }
        }
    }
    assert!(
        found.is_empty(),
        "{} plaintext windows in the stored file, the first (stored, plaintext offset): {:?}",
        found.len(),
        &found[..found.len().min(5)]
    );
    // And the bytes are all there, through the decrypting source.
    assert!(f.wrapping.read_plain(&f.store, &stored.path).await.unwrap() == data);
}

/// Sizes around the segment boundaries, and several MiB: the source's size,
/// the bytes and the one-pass digest are those ingested.
#[tokio::test]
async fn every_size_round_trips() {
    let f = fixture();
    for (i, len) in [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 3 * MIB + 7]
        .into_iter()
        .enumerate()
    {
        let data = random(len);
        let stored = f.write(&format!("rec-size-{i}"), &data);
        assert_eq!(stored.size, len as u64);
        let source = f.wrapping.source(&f.store, &stored.path).await.unwrap();
        assert_eq!(source.size(), len as u64, "{len}");
        assert_eq!(source.alignment(), SEG as u64);
        let back = f.wrapping.read_plain(&f.store, &stored.path).await.unwrap();
        assert!(back == data, "{len} bytes read back differ");
        let digest = source.digest().await.unwrap();
        assert_eq!(digest.sha256, Sha256Digest::of(&data), "{len}");
        assert_eq!(digest.crc32, crc32fast::hash(&data), "{len}");
        assert_eq!(digest.size, len as u64);
        let file_len = std::fs::metadata(&stored.path).unwrap().len() as usize;
        let segments = len.div_ceil(SEG).max(1);
        let header_len = FIXED_LEN + 8 + "acme".len() + format!("rec-size-{i}").len();
        assert_eq!(file_len, header_len + len + segments * TAG_LEN, "{len}");
    }
}

/// The ranges a multipart upload asks (8 MiB parts, the last one short,
/// each read twice), and unaligned ranges across segment boundaries.
#[tokio::test]
async fn multipart_and_unaligned_ranges_round_trip() {
    let f = fixture();
    let data = random(17 * MIB + 3);
    let stored = f.write("rec-ranges", &data);
    let part = 8 * MIB as u64;
    let mut ranges: Vec<(u64, u64)> = (0..data.len() as u64)
        .step_by(part as usize)
        .map(|o| (o, part.min(data.len() as u64 - o)))
        .collect();
    ranges.extend([
        (0, 0),
        (0, 1),
        (SEG as u64 - 1, 2),
        (SEG as u64, SEG as u64),
        (12_345, 3 * SEG as u64 + 17),
        (data.len() as u64 - 1, 1),
        (data.len() as u64, 0),
        (0, data.len() as u64),
    ]);
    for (offset, len) in ranges {
        for _ in 0..2 {
            let got = f.read_range(&stored.path, offset, len).await.unwrap();
            let want = &data[offset as usize..(offset + len) as usize];
            assert!(got == want, "range {offset}+{len}");
        }
    }
    let source = f.wrapping.source(&f.store, &stored.path).await.unwrap();
    let past = source.open_range(data.len() as u64, 1).await;
    assert!(past.is_err(), "a range past the end is refused");
}

/// A change to a backup's bytes.
type Edit = Box<dyn FnOnce(&mut Vec<u8>)>;

/// A copy of `path` changed by `edit`, in the same store (so the store's
/// path check passes).
fn tampered(
    store: &BackupStore,
    path: &Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<u8>),
) -> PathBuf {
    let mut bytes = std::fs::read(path).unwrap();
    edit(&mut bytes);
    let out = path.with_file_name(name);
    let _ = store;
    std::fs::write(&out, bytes).unwrap();
    out
}

/// What the worker and FetchBackup do, end to end: header, unwrap (the
/// stand-in vault's key), open, read everything. `Err` names the stage.
async fn read_all(f: &Fixture, path: &Path) -> Result<Vec<u8>, String> {
    let header = match f.store.read_header(path).await {
        Ok(Some(h)) => h,
        Ok(None) => return Err("no RVBK magic".into()),
        Err(e) => return Err(format!("header: {e}")),
    };
    let key = f
        .wrapping
        .unwrap(&header)
        .map_err(|s| format!("unwrap: {}", s.message()))?;
    let source = f
        .store
        .open_encrypted(path, header, key)
        .await
        .map_err(|e| format!("open ({:?}): {e}", e.kind()))?;
    let mut out = Vec::new();
    let mut reader = source.open_range(0, source.size()).await.unwrap();
    match reader.read_to_end(&mut out).await {
        Ok(_) => Ok(out),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
            Err(format!("read: {e}"))
        }
    }
}

/// Flipped bytes (header fields, first, middle and last segment, a tag),
/// truncation (inside the header, mid-segment, at a segment boundary),
/// dropped, swapped and duplicated segments, appended bytes, and another
/// backup's header: each fails, never yielding bytes.
#[tokio::test]
async fn every_tampering_fails_authentication() {
    let f = fixture();
    let data = random(3 * SEG + 5); // 4 segments, the last one short
    let stored = f.write("rec-tamper", &data);
    let path = &stored.path;
    assert_eq!(read_all(&f, path).await.unwrap(), data);
    let bytes = std::fs::read(path).unwrap();
    let header_len = f.store.read_header(path).await.unwrap().unwrap().len();
    let stride = SEG + TAG_LEN;
    let seg = move |i: usize| header_len + i * stride;
    let flip = |at: usize| move |b: &mut Vec<u8>| b[at] ^= 0x01;

    let mut cases: Vec<(String, PathBuf)> = Vec::new();
    let mut add = |name: &str, edit: Edit| {
        cases.push((
            name.to_owned(),
            tampered(&f.store, path, &format!("t-{}", cases.len()), edit),
        ));
    };
    for (name, at) in [
        ("magic", 0),
        ("format version", 4),
        ("segment aead id", 6),
        ("key_version", 16),
        ("segment_size", 19),
        ("nonce prefix", 21),
        ("enc", 40),
        ("wrapped key", 100),
        ("tenant id", FIXED_LEN + 5),
        ("recording id", header_len - 1),
        ("first segment", seg(0)),
        ("middle segment", seg(1) + SEG / 2),
        ("last segment", bytes.len() - TAG_LEN - 1),
        ("a tag", seg(1) + SEG),
        ("last tag", bytes.len() - 1),
    ] {
        add(&format!("flipped {name}"), Box::new(flip(at)));
    }
    add("cut inside the header", Box::new(|b| b.truncate(50)));
    add(
        "cut after the header",
        Box::new(move |b| b.truncate(header_len)),
    );
    add(
        "cut mid-segment",
        Box::new(move |b| b.truncate(seg(2) + 100)),
    );
    add(
        "last segment dropped",
        Box::new(move |b| b.truncate(seg(3))),
    );
    add(
        "middle segment dropped",
        Box::new(move |b| {
            b.drain(seg(1)..seg(2));
        }),
    );
    add(
        "segments 1 and 2 swapped",
        Box::new(move |b| {
            let one = b[seg(1)..seg(2)].to_vec();
            let two = b[seg(2)..seg(3)].to_vec();
            b[seg(1)..seg(2)].copy_from_slice(&two);
            b[seg(2)..seg(3)].copy_from_slice(&one);
        }),
    );
    add(
        "segment 1 duplicated",
        Box::new(move |b| {
            let one = b[seg(1)..seg(2)].to_vec();
            b.splice(seg(2)..seg(2), one);
        }),
    );
    add(
        "bytes appended",
        Box::new(|b| b.extend_from_slice(&[0u8; 40])),
    );
    // Another recording's header (its own data key) in front of these segments.
    let other = f.write("rec-tamper", &random(10));
    let other_header = std::fs::read(&other.path).unwrap()[..header_len].to_vec();
    add(
        "another backup's header",
        Box::new(move |b| {
            b[..header_len].copy_from_slice(&other_header);
        }),
    );

    for (name, path) in &cases {
        match read_all(&f, path).await {
            Ok(got) => panic!("{name}: read {} bytes without an error", got.len()),
            Err(stage) => println!("{name}: refused at {stage}"),
        }
    }
}

/// A file without the RVBK magic (an older uploader's backup in clear)
/// reads as "no header"; the worker then reads it as plaintext only for a
/// job without a stored-file SHA-256.
#[tokio::test]
async fn a_backup_in_clear_has_no_header() {
    let f = fixture();
    let dir = f.store.objects_dir().join("acme");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("legacy");
    std::fs::write(&path, b"an old recording in clear").unwrap();
    assert!(f.store.read_header(&path).await.unwrap().is_none());
    assert!(
        f.store
            .read_header(Path::new("/etc/hostname"))
            .await
            .is_err(),
        "only files of the store"
    );
}
