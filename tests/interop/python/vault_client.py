#!/usr/bin/env python3
"""A recvault vault client written with Python grpcio, not tonic.

It imports only code generated from proto/ (grpc_tools.protoc) at test time,
so it proves the .proto files are the whole contract: put a credential as the
manager, read its metadata, lease and release it as the uploader, and check
that the vault refuses what it must. Talks mTLS with the dev certificates.

Usage:
  vault_client.py --addr HOST:PORT --certs DIR --secret-file FILE --gen DIR

The secret is read from FILE (never from argv) and is never printed. Prints
"interop ok" as its last line on success; exits non-zero on any mismatch.
"""

import argparse
import datetime
import sys
import uuid


def fail(msg):
    print(f"interop FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--certs", required=True)
    ap.add_argument("--secret-file", required=True)
    ap.add_argument("--gen", required=True, help="directory with the generated vault_pb2*.py")
    ap.add_argument("--tenant", default="interop-py")
    ap.add_argument("--server-name", default="localhost")
    args = ap.parse_args()

    sys.path.insert(0, args.gen)
    import grpc
    from recvault.vault.v1 import vault_pb2 as pb
    from recvault.vault.v1 import vault_pb2_grpc as rpc

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    ca = read(f"{args.certs}/ca.crt")

    def channel(identity):
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=read(f"{args.certs}/{identity}.key"),
            certificate_chain=read(f"{args.certs}/{identity}.crt"),
        )
        ch = grpc.secure_channel(
            args.addr,
            creds,
            options=[("grpc.ssl_target_name_override", args.server_name)],
        )
        grpc.channel_ready_future(ch).result(timeout=15)
        return ch

    def expect_code(call, code, what):
        try:
            call()
        except grpc.RpcError as e:
            check(e.code() == code, f"{what}: expected {code.name}, got {e.code().name}: {e.details()}")
            return
        fail(f"{what}: expected {code.name}, but the call succeeded")

    secret = read(args.secret_file)
    request_id = f"py-interop-{uuid.uuid4()}"
    md = [("x-request-id", request_id)]
    timeout = 10

    # Manager: store the credential, read back its metadata (never the secret).
    manager = channel("manager")
    creds_api = rpc.CredentialsStub(manager)
    put = creds_api.PutCredential(
        pb.PutCredentialRequest(
            tenant_id=args.tenant,
            name="py-s3",
            kind=pb.CREDENTIAL_KIND_S3,
            secret=secret,
            labels={"client": "python-grpcio"},
        ),
        metadata=md,
        timeout=timeout,
    )
    check(put.credential_id != "", "PutCredential returned no credential_id")
    check(put.version == 1, f"PutCredential version {put.version}, want 1")
    print(f"put credential {put.credential_id} version {put.version}")

    meta = creds_api.GetCredential(
        pb.GetCredentialRequest(credential_id=put.credential_id), metadata=md, timeout=timeout
    )
    check(meta.credential_id == put.credential_id, "GetCredential: credential_id differs")
    check(meta.tenant_id == args.tenant, f"GetCredential: tenant_id {meta.tenant_id!r}")
    check(meta.name == "py-s3", f"GetCredential: name {meta.name!r}")
    check(meta.kind == pb.CREDENTIAL_KIND_S3, f"GetCredential: kind {meta.kind}")
    check(meta.version == 1, f"GetCredential: version {meta.version}")
    check(not meta.deleted, "GetCredential: deleted")
    check(meta.labels.get("client") == "python-grpcio", f"GetCredential: labels {dict(meta.labels)}")
    check(meta.key_version >= 1, f"GetCredential: key_version {meta.key_version}")
    check(
        meta.secret_chars == len(secret.decode("utf-8")),
        f"GetCredential: secret_chars {meta.secret_chars}, want {len(secret.decode('utf-8'))}",
    )
    check(meta.HasField("created_at"), "GetCredential: no created_at")
    check("secret" not in pb.Credential.DESCRIPTOR.fields_by_name, "Credential carries a secret field")
    print("get credential: metadata matches")

    # Uploader: lease the plaintext, check it, release it.
    uploader = channel("uploader")
    leases = rpc.LeasesStub(uploader)
    before = datetime.datetime.now(datetime.timezone.utc)
    lease = leases.AcquireLease(
        pb.AcquireLeaseRequest(credential_id=put.credential_id, purpose="rec-python-1", ttl_seconds=30),
        metadata=md,
        timeout=timeout,
    )
    check(lease.lease_id != "", "AcquireLease returned no lease_id")
    # Compare without ever printing the secret.
    check(lease.secret == secret, "AcquireLease: secret differs from what was put")
    check(lease.kind == pb.CREDENTIAL_KIND_S3, f"AcquireLease: kind {lease.kind}")
    check(lease.credential_version == 1, f"AcquireLease: credential_version {lease.credential_version}")
    check(lease.HasField("expires_at"), "AcquireLease: no expires_at")
    expires = lease.expires_at.ToDatetime(tzinfo=datetime.timezone.utc)
    now = datetime.datetime.now(datetime.timezone.utc)
    check(expires > now, f"AcquireLease: expires_at {expires.isoformat()} is not in the future")
    check(
        expires <= before + datetime.timedelta(seconds=31),
        f"AcquireLease: expires_at {expires.isoformat()} beyond the 30 s asked for",
    )
    print(f"acquired lease {lease.lease_id}, expires {expires.isoformat()}")

    released = leases.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=lease.lease_id), metadata=md, timeout=timeout)
    check(released.lease_id == lease.lease_id, "ReleaseLease: lease_id differs")
    print(f"released lease {lease.lease_id}")

    expect_code(
        lambda: leases.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=lease.lease_id), metadata=md, timeout=timeout),
        grpc.StatusCode.NOT_FOUND,
        "second ReleaseLease",
    )
    print("second release: NOT_FOUND")

    # The manager never gets plaintext.
    expect_code(
        lambda: rpc.LeasesStub(manager).AcquireLease(
            pb.AcquireLeaseRequest(credential_id=put.credential_id, purpose="rec-python-2"),
            metadata=md,
            timeout=timeout,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "AcquireLease as manager",
    )
    print("manager lease: PERMISSION_DENIED")

    manager.close()
    uploader.close()
    print("interop ok")


if __name__ == "__main__":
    main()
