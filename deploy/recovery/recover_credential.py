#!/usr/bin/env python3
"""Break-glass: print one stored credential's plaintext secret, from the
master key file and the vault's credential database alone, without vaultd.

    python3 recover_credential.py --master-key master.key --database vault.db CREDENTIAL_ID

The secret goes to standard output only (pipe it where it must go; it is never
written to a file by this script); a warning goes to standard error. The
database is opened read-only. Needs Python 3 and the PyPI package
`cryptography`. The format it reads is specified in vault/README.md,
"Stored credential format".
"""

import argparse
import os
import sqlite3
import sys
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import recvault_keys as keys  # noqa: E402
from recvault_keys import RecoveryError  # noqa: E402


def open_database(path):
    """A read-only connection (the vault may still be running: WAL allows it)."""
    if not os.path.isfile(path):
        raise RecoveryError("credential database %s does not exist" % path)
    uri = "file:%s?mode=ro" % quote(os.path.abspath(path))
    try:
        return sqlite3.connect(uri, uri=True)
    except sqlite3.Error as e:
        raise RecoveryError("cannot open credential database %s: %s" % (path, e))


def recover(master_key, db, credential_id):
    """The plaintext secret of the credential's current version."""
    row = db.execute(
        "SELECT tenant_id, version, deleted, key_version, sealed FROM credentials "
        "WHERE credential_id = ?",
        (credential_id,),
    ).fetchone()
    if row is None:
        raise RecoveryError("credential %s is not in this database" % credential_id)
    tenant_id, version, deleted, row_key_version, sealed = row
    if deleted or sealed is None:
        raise RecoveryError(
            "credential %s was deleted (crypto-shredded): its ciphertext is gone" % credential_id
        )
    sealed = bytes(sealed)
    key_version = keys.parse_header(sealed)
    if key_version != row_key_version:
        print(
            "warning: the row says key version %d, the envelope header %d; using the header"
            % (row_key_version, key_version),
            file=sys.stderr,
        )
    wrapped = db.execute(
        "SELECT wrapped FROM key_versions WHERE version = ?", (key_version,)
    ).fetchone()
    if wrapped is None:
        raise RecoveryError("key version %d is not in the key_versions table" % key_version)
    version_key = keys.unwrap_version_key(master_key, key_version, bytes(wrapped[0]))
    aad = keys.record_aad(tenant_id, credential_id, version, key_version)
    return keys.open_envelope(keys.credential_key(version_key, key_version), aad, sealed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--master-key", required=True, help="the vault's master.key file")
    parser.add_argument("--database", required=True, help="the vault's credential database (vault.db)")
    parser.add_argument("credential_id", help="e.g. cred_0123...")
    args = parser.parse_args(argv)
    keys.warn_break_glass("printing the plaintext of credential %s" % args.credential_id)
    try:
        master_key = keys.read_master_key(args.master_key)
        db = open_database(args.database)
        try:
            secret = recover(master_key, db, args.credential_id)
        finally:
            db.close()
    except (RecoveryError, sqlite3.Error) as e:
        print("recover_credential: %s" % e, file=sys.stderr)
        return 1
    sys.stdout.buffer.write(secret)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
