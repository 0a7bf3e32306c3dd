//! Authorization over real mTLS: every identity × every RPC is allowed or
//! PERMISSION_DENIED exactly as the policy says, and every denial is audited.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use recvault_proto::vault::v1::{
    AuditFilter, CredentialKind, DeleteCredentialRequest, GetCredentialRequest,
    GetSealingKeyRequest, GetWrappingKeyRequest, KeyStatusRequest, ListCredentialsRequest,
    QueryEventsRequest, ReleaseLeaseRequest, RetireKeysRequest, RewrapRequest, RotateKeyRequest,
    SetTenantLimitRequest, TailEventsRequest, VerifyChainRequest,
};
use recvault_vault::testing::{TEST_IDENTITIES, TestVault};
use tonic::{Code, Status};

const TENANT: &str = "acme";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Put,
    Get,
    List,
    Delete,
    Acquire,
    Release,
    Rotate,
    Rewrap,
    KeyStatus,
    SetLimit,
    Retire,
    Query,
    Tail,
    Verify,
    WrappingKey,
    Unwrap,
    SealingKey,
}

const RPCS: [Rpc; 17] = [
    Rpc::Put,
    Rpc::Get,
    Rpc::List,
    Rpc::Delete,
    Rpc::Acquire,
    Rpc::Release,
    Rpc::Rotate,
    Rpc::Rewrap,
    Rpc::KeyStatus,
    Rpc::SetLimit,
    Rpc::Retire,
    Rpc::Query,
    Rpc::Tail,
    Rpc::Verify,
    Rpc::WrappingKey,
    Rpc::Unwrap,
    Rpc::SealingKey,
];

/// Identities that hold a role in the dev policy.
const ROLE_HOLDERS: [&str; 4] = ["manager", "uploader", "auditor", "admin"];

impl Rpc {
    /// The role the policy requires, as the denial names it.
    fn role(self) -> &'static str {
        match self {
            Rpc::Put | Rpc::Get | Rpc::List | Rpc::Delete => "manager",
            Rpc::Acquire | Rpc::Release | Rpc::Unwrap => "uploader",
            Rpc::Rotate | Rpc::Rewrap | Rpc::KeyStatus | Rpc::SetLimit | Rpc::Retire => "admin",
            Rpc::Query | Rpc::Tail | Rpc::Verify => "auditor",
            // The public wrapping and sealing keys: any identity that holds some role.
            Rpc::WrappingKey | Rpc::SealingKey => "manager, uploader, auditor or admin",
        }
    }

    /// Whether `identity` may make this call under the dev policy.
    fn allows(self, identity: &str) -> bool {
        match self {
            Rpc::WrappingKey | Rpc::SealingKey => ROLE_HOLDERS.contains(&identity),
            _ => identity == self.role(),
        }
    }

    fn operation(self) -> &'static str {
        match self {
            Rpc::Put => op::PUT,
            Rpc::Get => op::GET,
            Rpc::List => op::LIST,
            Rpc::Delete => op::DELETE,
            Rpc::Acquire => op::ACQUIRE,
            Rpc::Release => op::RELEASE,
            Rpc::Rotate => op::ROTATE,
            Rpc::Rewrap => op::REWRAP,
            Rpc::KeyStatus => op::KEY_STATUS,
            Rpc::SetLimit => op::SET_LIMIT,
            Rpc::Retire => op::RETIRE,
            Rpc::Query => op::QUERY,
            Rpc::Tail => op::TAIL,
            Rpc::Verify => op::VERIFY,
            Rpc::WrappingKey => op::GET_WRAPPING_KEY,
            Rpc::Unwrap => op::UNWRAP,
            Rpc::SealingKey => op::GET_SEALING_KEY,
        }
    }

    /// What the call returns for an identity that holds the role. Delete
    /// targets an id that does not exist, so it must get past authorization
    /// and answer NOT_FOUND; everything else succeeds.
    fn expected_when_allowed(self) -> Code {
        match self {
            Rpc::Delete => Code::NotFound,
            _ => Code::Ok,
        }
    }
}

/// Things the calls refer to, created before the matrix runs.
struct Fixture {
    credential_id: String,
    lease_id: String,
    /// A data key of tenant acme's recording rec-1, wrapped to the vault: (enc, wrapped).
    wrapped: (Vec<u8>, Vec<u8>),
}

/// Makes one call of `rpc` as `identity` with a well-formed request, so that
/// only authorization (or, when allowed, the request itself) decides the answer.
async fn call(vault: &TestVault, identity: &str, rpc: Rpc, fx: &Fixture) -> Result<(), Status> {
    match rpc {
        Rpc::Put => credentials(vault, identity)
            .put_credential(put_request(
                TENANT,
                &format!("by-{identity}"),
                CredentialKind::S3,
                &s3_secret("AKIDEXAMPLE", "matrix-secret"),
            ))
            .await
            .map(drop),
        Rpc::Get => credentials(vault, identity)
            .get_credential(GetCredentialRequest {
                credential_id: fx.credential_id.clone(),
            })
            .await
            .map(drop),
        Rpc::List => credentials(vault, identity)
            .list_credentials(ListCredentialsRequest {
                tenant_id: TENANT.into(),
                include_deleted: false,
            })
            .await
            .map(drop),
        Rpc::Delete => credentials(vault, identity)
            .delete_credential(DeleteCredentialRequest {
                credential_id: "cred_00000000000000000000000000000000".into(),
            })
            .await
            .map(drop),
        Rpc::Acquire => leases(vault, identity)
            .acquire_lease(acquire_request(&fx.credential_id, 30))
            .await
            .map(drop),
        Rpc::Release => leases(vault, identity)
            .release_lease(ReleaseLeaseRequest {
                lease_id: fx.lease_id.clone(),
            })
            .await
            .map(drop),
        Rpc::Rotate => keys(vault, identity)
            .rotate_key(RotateKeyRequest {})
            .await
            .map(drop),
        Rpc::Rewrap => keys(vault, identity)
            .rewrap(RewrapRequest {
                tenant_id: String::new(),
            })
            .await
            .map(drop),
        Rpc::KeyStatus => keys(vault, identity)
            .key_status(KeyStatusRequest {})
            .await
            .map(drop),
        Rpc::SetLimit => keys(vault, identity)
            .set_tenant_limit(SetTenantLimitRequest {
                tenant_id: TENANT.into(),
                max_secret_chars: 6000,
            })
            .await
            .map(drop),
        Rpc::Retire => keys(vault, identity)
            .retire_keys(RetireKeysRequest {
                min_decrypt_version: 1,
            })
            .await
            .map(drop),
        Rpc::Query => audit(vault, identity)
            .query_events(QueryEventsRequest {
                filter: None,
                after_sequence: 0,
                limit: 1,
            })
            .await
            .map(drop),
        Rpc::Tail => audit(vault, identity)
            .tail_events(TailEventsRequest {
                filter: None,
                after_sequence: 0,
            })
            .await
            .map(drop),
        Rpc::Verify => audit(vault, identity)
            .verify_chain(VerifyChainRequest {})
            .await
            .map(drop),
        Rpc::WrappingKey => data_keys(vault, identity)
            .get_wrapping_key(GetWrappingKeyRequest {})
            .await
            .map(drop),
        Rpc::SealingKey => credentials(vault, identity)
            .get_sealing_key(GetSealingKeyRequest {})
            .await
            .map(drop),
        Rpc::Unwrap => {
            let (enc, wrapped) = &fx.wrapped;
            let (request, _) = unwrap_request(TENANT, "rec-1", enc, wrapped);
            data_keys(vault, identity)
                .unwrap_data_key(request)
                .await
                .map(drop)
        }
    }
}

/// Each of the eight test identities (four roles, plus vault, recorder,
/// stranger and other, which hold no grant) calls each of the 17 RPCs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn role_matrix_allows_exactly_the_policy_and_audits_every_denial() {
    let (_dir, vault) = start().await;
    let credential_id = put_s3(&vault, TENANT, "shared", "fixture-secret")
        .await
        .credential_id;
    let lease_id = acquire(&vault, &credential_id).await.lease_id;
    let (_, enc, wrapped) = wrap_data_key(vault.core.wrapping_key.public_key(), TENANT, "rec-1");
    let fx = Fixture {
        credential_id,
        lease_id,
        wrapped: (enc, wrapped),
    };

    let mut denials = Vec::new();
    let mut failures = Vec::new();
    for identity in TEST_IDENTITIES {
        for rpc in RPCS {
            let granted = rpc.allows(identity);
            let got = call(&vault, identity, rpc, &fx).await;
            let code = got.as_ref().err().map_or(Code::Ok, Status::code);
            let want = if granted {
                rpc.expected_when_allowed()
            } else {
                Code::PermissionDenied
            };
            if code != want {
                failures.push(format!("{identity} × {rpc:?}: want {want:?}, got {got:?}"));
            }
            if let Err(status) = &got
                && status.code() == Code::PermissionDenied
            {
                // The message tells the caller which role is missing.
                assert!(
                    status.message().contains(rpc.role()),
                    "{identity} × {rpc:?}: {status:?}"
                );
                denials.push((identity, rpc));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "role matrix mismatches:\n{}",
        failures.join("\n")
    );
    // Each RPC is allowed to its role only; GetWrappingKey and GetSealingKey to all four roles.
    let allowed: usize = RPCS
        .iter()
        .map(|rpc| TEST_IDENTITIES.iter().filter(|i| rpc.allows(i)).count())
        .sum();
    assert_eq!(allowed, RPCS.len() + 6);
    assert_eq!(denials.len(), TEST_IDENTITIES.len() * RPCS.len() - allowed);

    // Denied calls had no effect: only the fixture and the manager's own put exist.
    let names: Vec<_> = credentials(&vault, "manager")
        .list_credentials(ListCredentialsRequest {
            tenant_id: TENANT.into(),
            include_deleted: true,
        })
        .await
        .unwrap()
        .into_inner()
        .credentials
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["by-manager", "shared"]);

    // Every denial is in the audit log, exactly once, with identity, operation and code.
    let denied = query(
        &vault,
        AuditFilter {
            outcome: "denied".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(denied.len(), denials.len(), "one audit event per denial");
    for (identity, rpc) in &denials {
        let matching: Vec<_> = denied
            .iter()
            .filter(|e| e.identity == spiffe(identity) && e.operation == rpc.operation())
            .collect();
        assert_eq!(matching.len(), 1, "{identity} × {rpc:?}: {denied:#?}");
        let event = matching[0];
        assert_eq!(event.code, "PERMISSION_DENIED");
        assert_eq!(event.outcome, "denied");
        assert_eq!(event.cert_fingerprint.len(), 64, "{event:?}");
    }

    // Allowed calls are audited too, and not as denials.
    for identity in ROLE_HOLDERS {
        let events = query(
            &vault,
            AuditFilter {
                identity: spiffe(identity),
                ..Default::default()
            },
        )
        .await;
        for rpc in RPCS.iter().filter(|r| r.allows(identity)) {
            let for_rpc: Vec<_> = events
                .iter()
                .filter(|e| e.operation == rpc.operation())
                .collect();
            assert!(!for_rpc.is_empty(), "{identity} × {rpc:?} not audited");
            assert!(
                for_rpc.iter().all(|e| e.outcome != "denied"),
                "{identity} × {rpc:?}: {for_rpc:?}"
            );
        }
    }
    assert!(verify_chain(&vault).await.ok);
}

/// An identity with no grant at all, asked for something real, is refused
/// without learning whether the credential exists, and the refusal names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stranger_cannot_probe_credentials_or_get_plaintext() {
    let (_dir, vault) = start().await;
    let real = put_s3(&vault, TENANT, "real", "stranger-must-not-see")
        .await
        .credential_id;
    let fake = "cred_ffffffffffffffffffffffffffffffff".to_owned();
    for id in [&real, &fake] {
        let status = expect_code(
            leases(&vault, "stranger")
                .acquire_lease(acquire_request(id, 10))
                .await,
            Code::PermissionDenied,
        );
        assert!(status.message().contains(&spiffe("stranger")), "{status:?}");
        assert!(!status.message().contains("stranger-must-not-see"));
        expect_code(
            credentials(&vault, "stranger")
                .get_credential(GetCredentialRequest {
                    credential_id: id.clone(),
                })
                .await,
            Code::PermissionDenied,
        );
    }
    // Neither a manager nor an admin nor an auditor gets plaintext.
    for identity in ["manager", "admin", "auditor"] {
        expect_code(
            leases(&vault, identity)
                .acquire_lease(acquire_request(&real, 10))
                .await,
            Code::PermissionDenied,
        );
    }
    let denied = query(
        &vault,
        AuditFilter {
            identity: spiffe("stranger"),
            outcome: "denied".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(denied.len(), 4, "{denied:#?}");
}

/// Grants can be scoped to tenants; a lease can only be released by the
/// identity that acquired it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_scoped_grants_and_lease_holders() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut config = recvault_vault::testing::prepare(dir.path());
    // put_request sends its secret in clear, as grpcurl does.
    config.secrets.allow_plaintext = true;
    let mut policy = std::fs::read_to_string(&config.policy_file).unwrap();
    policy.push_str(&format!(
        "\n[[grant]]\nidentity = \"{}\"\nroles = [\"manager\", \"uploader\"]\ntenants = [\"acme\"]\n",
        spiffe("other")
    ));
    std::fs::write(&config.policy_file, policy).unwrap();
    let vault = TestVault::start_with(config).await;

    // "other" manages acme only.
    credentials(&vault, "other")
        .put_credential(put_request(
            "acme",
            "scoped",
            CredentialKind::S3,
            &s3_secret("AKID", "scoped-secret"),
        ))
        .await
        .unwrap();
    expect_code(
        credentials(&vault, "other")
            .put_credential(put_request(
                "globex",
                "scoped",
                CredentialKind::S3,
                &s3_secret("AKID", "scoped-secret"),
            ))
            .await,
        Code::PermissionDenied,
    );
    let globex = put_s3(&vault, "globex", "g", "globex-secret")
        .await
        .credential_id;
    expect_code(
        credentials(&vault, "other")
            .get_credential(GetCredentialRequest {
                credential_id: globex.clone(),
            })
            .await,
        Code::PermissionDenied,
    );
    // ...and may lease acme credentials, not globex ones.
    expect_code(
        leases(&vault, "other")
            .acquire_lease(acquire_request(&globex, 10))
            .await,
        Code::PermissionDenied,
    );
    let acme = put_s3(&vault, "acme", "a", "acme-secret")
        .await
        .credential_id;
    let lease = leases(&vault, "other")
        .acquire_lease(acquire_request(&acme, 10))
        .await
        .unwrap()
        .into_inner();
    assert!(String::from_utf8_lossy(&lease.secret).contains("acme-secret"));

    // The uploader holds its own lease; "other" cannot release it.
    let uploader_lease = acquire(&vault, &acme).await.lease_id;
    expect_code(
        leases(&vault, "other")
            .release_lease(ReleaseLeaseRequest {
                lease_id: uploader_lease.clone(),
            })
            .await,
        Code::NotFound,
    );
    leases(&vault, "uploader")
        .release_lease(ReleaseLeaseRequest {
            lease_id: uploader_lease,
        })
        .await
        .unwrap();
    leases(&vault, "other")
        .release_lease(ReleaseLeaseRequest {
            lease_id: lease.lease_id,
        })
        .await
        .unwrap();

    // "other" may unwrap the data keys of acme's recordings, not globex's.
    let public = vault.core.wrapping_key.public_key().to_vec();
    let (data_key, enc, wrapped) = wrap_data_key(&public, "acme", "rec-a");
    let (request, private) = unwrap_request("acme", "rec-a", &enc, &wrapped);
    let answer = data_keys(&vault, "other")
        .unwrap_data_key(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(open_resealed(&answer, &private, "acme", "rec-a"), data_key);
    let (_, enc, wrapped) = wrap_data_key(&public, "globex", "rec-g");
    let (request, _) = unwrap_request("globex", "rec-g", &enc, &wrapped);
    let status = expect_code(
        data_keys(&vault, "other").unwrap_data_key(request).await,
        Code::PermissionDenied,
    );
    assert!(
        status.message().contains("uploader role for tenant globex"),
        "{status:?}"
    );
    let denied = query(
        &vault,
        AuditFilter {
            identity: spiffe("other"),
            operation: op::UNWRAP.into(),
            ..Default::default()
        },
    )
    .await;
    let outcomes: Vec<_> = denied
        .iter()
        .map(|e| (e.tenant_id.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(outcomes, [("acme", "allowed"), ("globex", "denied")]);
}

/// An identity without the role learns nothing from its input either: a
/// malformed id, an empty tenant or a bad lease id is PERMISSION_DENIED for it
/// (and audited as a denial), not INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_from_an_identity_without_the_role_is_denied_not_validated() {
    let (_dir, vault) = start().await;
    expect_code(
        credentials(&vault, "stranger")
            .put_credential(put_request(
                "",
                "x",
                recvault_proto::vault::v1::CredentialKind::Generic,
                b"s",
            ))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        leases(&vault, "stranger")
            .acquire_lease(acquire_request("not/an/id", 30))
            .await,
        Code::PermissionDenied,
    );
    expect_code(
        leases(&vault, "manager")
            .release_lease(recvault_proto::vault::v1::ReleaseLeaseRequest {
                lease_id: String::new(),
            })
            .await,
        Code::PermissionDenied,
    );
    // The role holder still gets the precise validation error.
    let status = expect_code(
        credentials(&vault, "manager")
            .put_credential(put_request(
                "",
                "x",
                recvault_proto::vault::v1::CredentialKind::Generic,
                b"s",
            ))
            .await,
        Code::InvalidArgument,
    );
    assert!(
        status.message().contains("tenant_id"),
        "{}",
        status.message()
    );
}
