"""Break-glass key derivations of the recvault vault, written from the format
specification in vault/README.md ("Stored credential format", "Backup
wrapping key") as an implementation independent of the vault's Rust code.

Only Python's standard library and the PyPI packages `cryptography` (HKDF,
AES-CBC, X25519) and, for backups, `pyhpke` (RFC 9180) are used. Nothing here
writes a key or a secret anywhere; callers decide where plaintext goes.
"""

import hashlib
import hmac
import os
import stat
import struct
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# HKDF-SHA-256 salt of every key derived from the master key (vault/src/keyring.rs).
MASTER_KEY_SALT = b"recvault.master-key.hkdf-salt.v1"
# HKDF info of the key-encryption key that wraps the stored key versions.
KEK_INFO = b"recvault keyring kek v1"
# HKDF-SHA-256 salt of the credential keys derived from a version key.
VERSION_KEY_SALT = b"recvault.version-key.hkdf-salt.v1"
# HKDF info of the backup wrapping key, generation 1.
WRAPPING_KEY_INFO = {1: b"recvault backup-wrap X25519 v1"}
# HPKE info of a data key wrapped by the uploader (recvault_runtime::datakey::WRAP_INFO).
WRAP_INFO = b"recvault backup data key v1"


class RecoveryError(Exception):
    """A recovery step failed; the message says which and what to check."""


def warn_break_glass(what):
    """Tells the operator on stderr that this is the break-glass path."""
    print(
        "recvault BREAK-GLASS: %s. This bypasses the vault's policy and audit log; "
        "record who ran it and why, and rotate what you recover." % what,
        file=sys.stderr,
    )


def read_master_key(path):
    """The 32-byte master key from its file: 64 lowercase hex characters on
    one line, optional trailing newline (vault/src/keyring.rs)."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(67)
    except OSError as e:
        raise RecoveryError("cannot read master key file %s: %s" % (path, e.strerror))
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(
            "warning: master key file %s is accessible to group or others (mode %04o); "
            "run: chmod 600 %s" % (path, stat.S_IMODE(mode), path),
            file=sys.stderr,
        )
    if data.endswith(b"\n"):
        data = data[:-1]
    if len(data) != 64 or any(c not in b"0123456789abcdef" for c in data):
        raise RecoveryError(
            "master key file %s is malformed: expected exactly 64 lowercase hex "
            "characters (32 bytes) on one line" % path
        )
    return bytes.fromhex(data.decode("ascii"))


def hkdf_sha256(salt, ikm, info, length):
    """HKDF-SHA-256 (RFC 5869), extract then expand."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def derive_from_master(master_key, info, length):
    """A key derived from the master key, as `MasterKey::derive` does."""
    return hkdf_sha256(MASTER_KEY_SALT, master_key, info, length)


# ---- credential envelopes: A256CBC-HS512 (RFC 7518 §5.2) ----------------------

ENVELOPE_MAGIC = b"RV"
ENVELOPE_FORMAT_VERSION = 1
ALG_A256CBC_HS512 = 1
HEADER_LEN = 8
IV_LEN = 16
TAG_LEN = 32


def parse_header(sealed):
    """(key_version) of an envelope: "RV" | 0x01 | 0x01 | u32be key version."""
    if len(sealed) < HEADER_LEN + IV_LEN + 16 + TAG_LEN:
        raise RecoveryError("the envelope is too short to be a recvault envelope")
    if sealed[:2] != ENVELOPE_MAGIC or sealed[2] != ENVELOPE_FORMAT_VERSION:
        raise RecoveryError("the envelope does not start with RV and format version 1")
    if sealed[3] != ALG_A256CBC_HS512:
        raise RecoveryError("the envelope names algorithm %d, not A256CBC-HS512 (1)" % sealed[3])
    return struct.unpack(">I", sealed[4:8])[0]


def open_envelope(key, aad, sealed):
    """Opens header | IV | C | T under a 64-byte A256CBC-HS512 key. The
    authenticated data is header ‖ aad (RFC 7518 §5.2.2.2: the tag is checked,
    in constant time, before anything is decrypted)."""
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    parse_header(sealed)
    if len(key) != 64:
        raise RecoveryError("an A256CBC-HS512 key is 64 bytes")
    mac_key, enc_key = key[:32], key[32:]
    header = sealed[:HEADER_LEN]
    iv = sealed[HEADER_LEN:HEADER_LEN + IV_LEN]
    ciphertext = sealed[HEADER_LEN + IV_LEN:-TAG_LEN]
    tag = sealed[-TAG_LEN:]
    a = header + aad
    al = struct.pack(">Q", len(a) * 8)
    full = hmac.new(mac_key, a + iv + ciphertext + al, hashlib.sha512).digest()
    if not hmac.compare_digest(full[:TAG_LEN], tag):
        raise RecoveryError(
            "the envelope does not authenticate: wrong master key, another row, or altered bytes"
        )
    if len(ciphertext) % 16:
        raise RecoveryError("the envelope's ciphertext is not whole AES blocks")
    decryptor = Cipher(algorithms.AES(enc_key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        # Authentic but badly padded: only a broken writer produces this.
        raise RecoveryError("the authenticated envelope has invalid PKCS#7 padding") from None


def version_key_aad(version):
    """AAD of a wrapped key version: "recvault.keyring.version.v1" ‖ u32be(version)."""
    return b"recvault.keyring.version.v1" + struct.pack(">I", version)


def unwrap_version_key(master_key, version, wrapped):
    """The 32-byte key of one key version, from its `key_versions.wrapped`."""
    if parse_header(wrapped) != version:
        raise RecoveryError("the wrapped key of version %d names another version" % version)
    kek = derive_from_master(master_key, KEK_INFO, 64)
    key = open_envelope(kek, version_key_aad(version), wrapped)
    if len(key) != 32:
        raise RecoveryError("key version %d does not unwrap to 32 bytes" % version)
    return key


def credential_key(version_key, version):
    """The 64-byte A256CBC-HS512 key of a key version."""
    info = ("recvault credential A256CBC-HS512 v%d" % version).encode("ascii")
    return hkdf_sha256(VERSION_KEY_SALT, version_key, info, 64)


def record_aad(tenant_id, credential_id, credential_version, key_version):
    """u64be-length-prefixed "recvault.credential.v1", tenant, credential id,
    then u32be credential version and u32be key version."""
    out = b""
    for s in (b"recvault.credential.v1", tenant_id.encode(), credential_id.encode()):
        out += struct.pack(">Q", len(s)) + s
    return out + struct.pack(">II", credential_version, key_version)


# ---- backup data keys: HPKE (RFC 9180) -----------------------------------------


def wrapping_private_key(master_key, key_version=1):
    """The X25519 private key (32 bytes) of a wrapping key generation."""
    info = WRAPPING_KEY_INFO.get(key_version)
    if info is None:
        raise RecoveryError(
            "key_version %d is not a known wrapping key generation (known: %s)"
            % (key_version, sorted(WRAPPING_KEY_INFO))
        )
    return derive_from_master(master_key, info, 32)


def wrapping_public_key(master_key, key_version=1):
    """The X25519 public key (RFC 7748) that `vaultd wrapping-key` prints."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    private = X25519PrivateKey.from_private_bytes(wrapping_private_key(master_key, key_version))
    return private.public_key().public_bytes_raw()


def binding(tenant_id, recording_id):
    """HPKE aad: u32be(len(tenant)) ‖ tenant ‖ u32be(len(recording)) ‖ recording."""
    t, r = tenant_id.encode(), recording_id.encode()
    return struct.pack(">I", len(t)) + t + struct.pack(">I", len(r)) + r


def open_wrapped_data_key(master_key, tenant_id, recording_id, enc, wrapped_key, key_version=1):
    """The 32-byte data key of a recording backup, from the `enc` and
    `wrapped_key` in its header: HPKE base mode, DHKEM(X25519, HKDF-SHA256),
    HKDF-SHA256, AES-256-GCM, info "recvault backup data key v1"."""
    from pyhpke import AEADId, CipherSuite, KDFId, KEMId

    if len(enc) != 32 or len(wrapped_key) != 48:
        raise RecoveryError("enc must be 32 bytes and wrapped_key 48 bytes")
    suite = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)
    skr = suite.kem.deserialize_private_key(wrapping_private_key(master_key, key_version))
    try:
        # RFC 9180 §5.1.1 SetupBaseR, then the context's first Open (§5.2).
        context = suite.create_recipient_context(enc, skr, info=WRAP_INFO)
        key = context.open(wrapped_key, aad=binding(tenant_id, recording_id))
    except Exception:
        raise RecoveryError(
            "the wrapped data key does not open for this tenant and recording "
            "(wrong master key, tenant, recording id, or altered bytes)"
        ) from None
    if len(key) != 32:
        raise RecoveryError("the wrapped data key is not 32 bytes")
    return key
