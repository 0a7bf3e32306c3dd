#!/usr/bin/env python3
"""Break-glass: decrypt one recvault backup with the vault's master key alone.

    recover_backup.py --master-key FILE [--sha256 HEX] BACKUP > recording

For the security team when the vault cannot run: it needs only the master
key file (64 hex digits, as `vaultd init` writes it) and a backup file from
the uploader's backup store (`objects/<tenant>/<job_id>`). It is an
independent implementation of the format in uploader/README.md ("Backup
format"), using PyPI `pyhpke` (RFC 9180) and `cryptography` (HKDF, AES-GCM):

1. wrapping private key = HKDF-SHA-256(salt "recvault.master-key.hkdf-salt.v1",
   ikm = master key, info "recvault backup-wrap X25519 v1", 32 bytes), an
   X25519 private key (RFC 7748);
2. data key = HPKE base-mode open of the header's wrapped key, suite
   DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, info
   "recvault backup data key v1", aad = u32be(len tenant) ‖ tenant ‖
   u32be(len recording) ‖ recording;
3. every segment: AES-256-GCM open with nonce prefix ‖ u32be(index) ‖
   u8(last), aad = SHA-256(header bytes).

The plaintext goes to stdout, never to a file of ours; its SHA-256 and size
go to stderr at the end (compare them with the job's). Any authentication
failure stops at once with exit status 1; whatever was written before it
is incomplete and must be discarded. A bad key file also exits 1, wrong
usage 2.
"""

import argparse
import hashlib
import struct
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.exceptions import InvalidTag
from pyhpke import AEADId, CipherSuite, KDFId, KEMId

MAGIC = b"RVBK"
FORMAT_VERSION = 1
AEAD_AES_256_GCM = 0x0002
KEM_X25519_HKDF_SHA256 = 0x0020
KDF_HKDF_SHA256 = 0x0001
TAG_LEN = 16
FIXED_LEN = 108
MAX_ID_LEN = 128
WRAP_INFO = b"recvault backup data key v1"
# Used when recvault_keys.py (the vault's recovery helpers) is not beside this
# script: the same derivation as the vault's MasterKey::derive (keyring.rs).
MASTER_KEY_SALT = b"recvault.master-key.hkdf-salt.v1"
WRAP_KEY_INFO = b"recvault backup-wrap X25519 v1"
WRAP_KEY_VERSION = 1


class Refused(Exception):
    """The backup cannot be recovered; the message says why."""


def load_master_key(path):
    with open(path, "rb") as f:
        text = f.read(200)
    digits = text[:-1] if text.endswith(b"\n") else text
    if len(digits) != 64 or any(c not in b"0123456789abcdef" for c in digits):
        raise SystemExit(
            f"recover_backup: {path} is not a master key file (64 lowercase hex digits, "
            "optional newline)"
        )
    return bytes.fromhex(digits.decode())


def wrapping_private_key(master_key):
    try:
        # The vault's own break-glass helpers (deploy/recovery/recvault_keys.py),
        # when they ship beside this script: one derivation for both scripts.
        from recvault_keys import wrapping_private_key as derive  # type: ignore

        return derive(master_key, WRAP_KEY_VERSION)
    except ImportError:
        pass
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=MASTER_KEY_SALT, info=WRAP_KEY_INFO
    ).derive(master_key)


def binding(tenant, recording):
    return (
        struct.pack(">I", len(tenant)) + tenant + struct.pack(">I", len(recording)) + recording
    )


def parse_header(f):
    fixed = f.read(FIXED_LEN)
    if len(fixed) < 4 or fixed[:4] != MAGIC:
        raise Refused("no RVBK magic: not an encrypted backup (a backup in clear needs no recovery)")
    if len(fixed) < FIXED_LEN:
        raise Refused("the file ends inside the header")
    version = fixed[4]
    if version != FORMAT_VERSION:
        raise Refused(f"format version {version} is not supported (this script reads 1)")
    seg_aead, kem, kdf, wrap_aead = struct.unpack(">HHHH", fixed[5:13])
    if (seg_aead, kem, kdf, wrap_aead) != (
        AEAD_AES_256_GCM,
        KEM_X25519_HKDF_SHA256,
        KDF_HKDF_SHA256,
        AEAD_AES_256_GCM,
    ):
        raise Refused(f"unsupported algorithm ids {seg_aead:#06x} {kem:#06x} {kdf:#06x} {wrap_aead:#06x}")
    key_version, segment_size = struct.unpack(">II", fixed[13:21])
    nonce_prefix = fixed[21:28]
    enc = fixed[28:60]
    wrapped = fixed[60:108]
    ids = []
    raw = fixed
    for field in ("tenant_id", "recording_id"):
        n = f.read(4)
        if len(n) < 4:
            raise Refused("the file ends inside the header")
        (length,) = struct.unpack(">I", n)
        if not 0 < length <= MAX_ID_LEN:
            raise Refused(f"header field {field} has an invalid length {length}")
        value = f.read(length)
        if len(value) < length:
            raise Refused("the file ends inside the header")
        ids.append(value)
        raw += n + value
    if not 1024 <= segment_size <= 16 << 20:
        raise Refused(f"segment size {segment_size} is out of range")
    return {
        "bytes": raw,
        "key_version": key_version,
        "segment_size": segment_size,
        "nonce_prefix": nonce_prefix,
        "enc": enc,
        "wrapped": wrapped,
        "tenant": ids[0],
        "recording": ids[1],
    }


def recover(master_key, path, out):
    with open(path, "rb") as f:
        f.seek(0, 2)
        file_len = f.tell()
        f.seek(0)
        header = parse_header(f)
        if header["key_version"] != WRAP_KEY_VERSION:
            raise Refused(
                f"the data key is wrapped to key_version {header['key_version']}; this script "
                f"derives version {WRAP_KEY_VERSION}"
            )
        suite = CipherSuite.new(
            KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM
        )
        private = suite.kem.deserialize_private_key(wrapping_private_key(master_key))
        aad = binding(header["tenant"], header["recording"])
        try:
            recipient = suite.create_recipient_context(header["enc"], private, info=WRAP_INFO)
            data_key = recipient.open(header["wrapped"], aad=aad)
        except Exception as e:  # pyhpke raises its own OpenError
            raise Refused(
                "the wrapped data key does not open: the header was modified, or this is not "
                f"the master key the backup was wrapped for ({type(e).__name__})"
            ) from None
        aead = AESGCM(data_key)
        segment_aad = hashlib.sha256(header["bytes"]).digest()
        size = header["segment_size"]
        stride = size + TAG_LEN
        body = file_len - len(header["bytes"])
        if body < TAG_LEN:
            raise Refused("no segment follows the header: the backup was cut short")
        segments = -(-body // stride)
        last_len = body - (segments - 1) * stride
        if last_len < TAG_LEN or (segments > 1 and last_len == TAG_LEN):
            raise Refused("the last segment is malformed: the backup was cut short or extended")
        sha = hashlib.sha256()
        total = 0
        for index in range(segments):
            last = index == segments - 1
            stored = f.read(last_len if last else stride)
            nonce = header["nonce_prefix"] + struct.pack(">IB", index, 1 if last else 0)
            try:
                plain = aead.decrypt(nonce, stored, segment_aad)
            except InvalidTag:
                raise Refused(
                    f"segment {index} does not authenticate: the backup was modified, reordered "
                    "or cut short"
                ) from None
            sha.update(plain)
            total += len(plain)
            out.write(plain)
        out.flush()
        return sha.hexdigest(), total, header


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--master-key", required=True, help="the vault's master key file")
    parser.add_argument("--sha256", help="expected SHA-256 of the recording (the job's), hex")
    parser.add_argument("backup", help="a backup file: objects/<tenant>/<job_id>")
    args = parser.parse_args()
    if sys.stdout.isatty():
        raise SystemExit("recover_backup: redirect stdout to a file; the recording is binary")
    print(
        "recover_backup: BREAK-GLASS recovery with the master key; handle the output as the "
        "recording itself",
        file=sys.stderr,
    )
    master_key = load_master_key(args.master_key)
    try:
        digest, size, header = recover(master_key, args.backup, sys.stdout.buffer)
    except Refused as e:
        print(f"recover_backup: {args.backup}: {e}; the output is incomplete", file=sys.stderr)
        return 1
    print(
        f"recover_backup: tenant {header['tenant'].decode()} recording "
        f"{header['recording'].decode()}: {size} bytes, SHA-256 {digest}",
        file=sys.stderr,
    )
    if args.sha256 and args.sha256.strip().lower() != digest:
        print(f"recover_backup: SHA-256 {digest} is not the expected {args.sha256}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
