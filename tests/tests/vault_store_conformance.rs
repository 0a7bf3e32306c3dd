//! The vault store conformance suite: every backend of
//! `recvault_vault::store` passes the same tests, instantiated per backend
//! by `conformance_suite!` (after quickwit's `metastore_test_suite!`). The
//! commit gate is part of it: a change whose gate fails is not committed.

#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, sync::Arc};

use recvault_vault::{
    ids::LeaseId,
    ids::{CredentialId, TenantId},
    store::{
        CredentialRow, KeyringState, LeaseProblem, LeaseStore, NewCredential, NewLease, StoreError,
        VaultStore,
    },
};
use std::time::Duration;

/// A database a test can open (and open again, as a restart does).
trait Backend {
    fn open(&self) -> Arc<dyn VaultStore>;
    /// The lease table as one vault replica sees it; a second call is
    /// another replica on the same database (the same table, for a backend
    /// that has only one process).
    fn leases(&self) -> Arc<dyn LeaseStore>;
}

struct Sqlite(tempfile::TempDir, Arc<recvault_vault::leases::Leases>);

impl Backend for Sqlite {
    fn leases(&self) -> Arc<dyn LeaseStore> {
        self.1.clone()
    }

    fn open(&self) -> Arc<dyn VaultStore> {
        Arc::new(
            recvault_vault::store::sqlite::SqliteStore::open(&self.0.path().join("vault.db"))
                .unwrap(),
        )
    }
}

fn sqlite() -> Option<Sqlite> {
    Some(Sqlite(tempfile::tempdir().unwrap(), Arc::default()))
}

/// A fresh database on the test process's PostgreSQL server, reached
/// through a `database_url_file` as vaultd reaches it.
struct Postgres {
    url_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Postgres {
    fn replica(&self) -> Arc<recvault_vault::store::postgres::PostgresStore> {
        use recvault_vault::store::postgres::{PgTarget, PostgresStore};
        let target = PgTarget::from_url_file(&self.url_file, "conformance").unwrap();
        Arc::new(PostgresStore::open(target).unwrap())
    }
}

impl Backend for Postgres {
    fn open(&self) -> Arc<dyn VaultStore> {
        self.replica()
    }

    fn leases(&self) -> Arc<dyn LeaseStore> {
        self.replica()
    }
}

fn postgres() -> Option<Postgres> {
    let db = recvault_tests::postgres::Postgres::shared()?.database();
    let dir = tempfile::tempdir().unwrap();
    let url_file = db.url_file(dir.path());
    Some(Postgres {
        url_file,
        _dir: dir,
    })
}

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).unwrap()
}

fn refused() -> Result<(), String> {
    Err("audit down".to_owned())
}

/// Puts `name` for `tenant` with `sealed` as the envelope under key version 1.
fn put(
    store: &dyn VaultStore,
    tenant: &TenantId,
    name: &str,
    sealed: &[u8],
) -> Result<(CredentialId, u32), StoreError> {
    let labels = BTreeMap::from([("team".to_owned(), "media".to_owned())]);
    let new = NewCredential {
        tenant_id: tenant,
        name,
        kind: 1,
        labels: &labels,
        secret_chars: 40,
    };
    store.put(&new, &mut |_, _| Ok((sealed.to_vec(), 1)), &mut |_, _| {
        Ok(())
    })
}

/// Credential "n" of `tenant`, one character long.
fn new_credential<'a>(
    tenant: &'a TenantId,
    labels: &'a BTreeMap<String, String>,
) -> NewCredential<'a> {
    NewCredential {
        tenant_id: tenant,
        name: "n",
        kind: 1,
        labels,
        secret_chars: 1,
    }
}

fn get(store: &dyn VaultStore, id: &CredentialId) -> CredentialRow {
    store.get(id).unwrap().expect("row exists")
}

mod suite {
    use super::*;

    pub fn put_then_get_and_list(b: &dyn Backend) {
        let store = b.open();
        let acme = tenant("acme");
        let (id, v1) = put(store.as_ref(), &acme, "archive", b"one").unwrap();
        assert_eq!(v1, 1);
        let row = get(store.as_ref(), &id);
        assert_eq!(row.tenant_id, acme);
        assert_eq!(row.name, "archive");
        assert_eq!(row.kind, 1);
        assert_eq!(row.labels.get("team").map(String::as_str), Some("media"));
        assert_eq!((row.key_version, row.secret_chars), (1, 40));
        assert_eq!(row.sealed.as_deref(), Some(&b"one"[..]));
        assert!(!row.deleted);
        assert!(row.created_at > 1_700_000_000 && row.updated_at >= row.created_at);

        // The same (tenant, name) again is a new version of the same id.
        let (same, v2) = put(store.as_ref(), &acme, "archive", b"two").unwrap();
        assert_eq!((&same, v2), (&id, 2));
        assert_eq!(
            get(store.as_ref(), &id).sealed.as_deref(),
            Some(&b"two"[..])
        );
        // Another tenant's credential of the same name is another id.
        let (other, _) = put(store.as_ref(), &tenant("globex"), "archive", b"g").unwrap();
        assert_ne!(other, id);
        put(store.as_ref(), &acme, "backup", b"b").unwrap();

        let names: Vec<_> = store
            .list(&acme, false)
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["archive", "backup"]);
        assert!(store.list(&tenant("initech"), true).unwrap().is_empty());
        let unknown = CredentialId::parse("cred_unknown").unwrap();
        assert!(store.get(&unknown).unwrap().is_none());

        // What was committed survives a restart.
        drop(store);
        let reopened = b.open();
        assert_eq!(get(reopened.as_ref(), &id).version, 2);
    }

    pub fn the_put_gate_sees_the_new_id_and_version(b: &dyn Backend) {
        let store = b.open();
        let acme = tenant("acme");
        let (id, _) = put(store.as_ref(), &acme, "n", b"one").unwrap();
        let labels = BTreeMap::new();
        let new = new_credential(&acme, &labels);
        let (mut sealed_for, mut gated_for) = (None, None);
        let got = store
            .put(
                &new,
                &mut |id, v| {
                    sealed_for = Some((id.clone(), v));
                    Ok((b"x".to_vec(), 3))
                },
                &mut |id, v| {
                    gated_for = Some((id.clone(), v));
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(got, (id.clone(), 2));
        assert_eq!(sealed_for, Some((id.clone(), 2)));
        assert_eq!(gated_for, Some((id.clone(), 2)));
        assert_eq!(get(store.as_ref(), &id).key_version, 3);
    }

    pub fn a_failed_gate_rolls_every_change_back(b: &dyn Backend) {
        let store = b.open();
        let acme = tenant("acme");
        let labels = BTreeMap::new();
        let new = new_credential(&acme, &labels);
        let err = store
            .put(&new, &mut |_, _| Ok((b"x".to_vec(), 1)), &mut |_, _| {
                refused()
            })
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Gate(ref r) if r == "audit down"),
            "{err}"
        );
        assert!(
            store.list(&acme, true).unwrap().is_empty(),
            "put must not commit"
        );

        let (id, v) = put(store.as_ref(), &acme, "n", b"one").unwrap();
        let err = store
            .put(&new, &mut |_, _| Ok((b"x".to_vec(), 1)), &mut |_, _| {
                refused()
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::Gate(_)), "{err}");
        assert_eq!(
            get(store.as_ref(), &id).version,
            v,
            "a new version must not commit"
        );

        assert!(matches!(
            store.delete(&id, &mut refused),
            Err(StoreError::Gate(_))
        ));
        assert!(!get(store.as_ref(), &id).deleted, "delete must not commit");
        let rows = [(id.clone(), v, b"two".to_vec(), 2)];
        assert!(matches!(
            store.replace_sealed(&rows, &mut |_| refused()),
            Err(StoreError::Gate(_))
        ));
        assert_eq!(
            get(store.as_ref(), &id).sealed.as_deref(),
            Some(&b"one"[..])
        );
        assert!(matches!(
            store.insert_key_version(9, b"w", &mut refused),
            Err(StoreError::Gate(_))
        ));
        assert!(store.key_versions().unwrap().is_empty());
        assert!(matches!(
            store.set_setting("s", 1, &mut refused),
            Err(StoreError::Gate(_))
        ));
        assert_eq!(store.setting("s").unwrap(), None);
        assert!(matches!(
            store.set_tenant_limit(&acme, Some(7), &mut refused),
            Err(StoreError::Gate(_))
        ));
        assert_eq!(store.tenant_limit(&acme).unwrap(), None);

        // Nothing half-written reappears after a restart either.
        drop(store);
        let reopened = b.open();
        assert_eq!(reopened.list(&acme, true).unwrap().len(), 1);
        assert!(reopened.key_versions().unwrap().is_empty());
    }

    pub fn a_failed_seal_stores_nothing_and_skips_the_gate(b: &dyn Backend) {
        let store = b.open();
        let acme = tenant("acme");
        let labels = BTreeMap::new();
        let new = new_credential(&acme, &labels);
        let mut gated = false;
        let err = store
            .put(
                &new,
                &mut |_, _| Err("no key version".to_owned()),
                &mut |_, _| {
                    gated = true;
                    Ok(())
                },
            )
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Seal(ref r) if r == "no key version"),
            "{err}"
        );
        assert!(!gated, "no audit event for a change that never happened");
        assert!(store.list(&acme, true).unwrap().is_empty());
    }

    pub fn delete_shreds_and_keeps_a_tombstone(b: &dyn Backend) {
        let store = b.open();
        let acme = tenant("acme");
        let (id, _) = put(store.as_ref(), &acme, "n", b"one").unwrap();
        let mut gates = 0;
        assert!(
            store
                .delete(&id, &mut || {
                    gates += 1;
                    Ok(())
                })
                .unwrap()
        );
        assert_eq!(gates, 1);
        let tombstone = get(store.as_ref(), &id);
        assert!(tombstone.deleted && tombstone.sealed.is_none());
        assert_eq!(tombstone.key_version, 0);
        // Deleting again (or an unknown id) is false and audits nothing.
        assert!(
            !store
                .delete(&id, &mut || panic!("gate on a no-op"))
                .unwrap()
        );
        let unknown = CredentialId::parse("cred_unknown").unwrap();
        assert!(
            !store
                .delete(&unknown, &mut || panic!("gate on a no-op"))
                .unwrap()
        );
        assert!(store.list(&acme, false).unwrap().is_empty());
        assert_eq!(store.list(&acme, true).unwrap().len(), 1);
        // The name is free again: a new credential, new id, version 1.
        let (fresh, v) = put(store.as_ref(), &acme, "n", b"two").unwrap();
        assert_ne!(fresh, id);
        assert_eq!(v, 1);
        assert!(store.cached(&id).is_none_or(|row| row.deleted));
    }

    pub fn rewrap_skips_rows_a_put_changed(b: &dyn Backend) {
        let store = b.open();
        let acme = tenant("acme");
        let globex = tenant("globex");
        let (a, av) = put(store.as_ref(), &acme, "a", b"a1").unwrap();
        let (g, gv) = put(store.as_ref(), &globex, "g", b"g1").unwrap();
        let (gone, _) = put(store.as_ref(), &acme, "gone", b"x").unwrap();
        store.delete(&gone, &mut || Ok(())).unwrap();

        let mut stale: Vec<_> = store
            .stale_sealed(2, None)
            .unwrap()
            .into_iter()
            .map(|r| r.credential_id)
            .collect();
        stale.sort();
        let mut expected = vec![a.clone(), g.clone()];
        expected.sort();
        assert_eq!(
            stale, expected,
            "live rows under key 1, not the deleted one"
        );
        let of_acme = store.stale_sealed(2, Some(&acme)).unwrap();
        assert_eq!(of_acme.len(), 1);
        assert_eq!(of_acme[0].credential_id, a);
        assert!(store.stale_sealed(1, None).unwrap().is_empty());

        // acme's row gets a new version between reading and rewrapping.
        put(store.as_ref(), &acme, "a", b"a2").unwrap();
        let rows = [
            (a.clone(), av, b"a1-rewrapped".to_vec(), 2),
            (g.clone(), gv, b"g1-rewrapped".to_vec(), 2),
        ];
        let mut gated = None;
        let n = store
            .replace_sealed(&rows, &mut |n| {
                gated = Some(n);
                Ok(())
            })
            .unwrap();
        assert_eq!((n, gated), (1, Some(1)));
        assert_eq!(get(store.as_ref(), &a).sealed.as_deref(), Some(&b"a2"[..]));
        let g_row = get(store.as_ref(), &g);
        assert_eq!(g_row.sealed.as_deref(), Some(&b"g1-rewrapped"[..]));
        assert_eq!(g_row.key_version, 2);
        assert_eq!(
            store.count_by_key_version().unwrap(),
            BTreeMap::from([(1, 1), (2, 1)])
        );
    }

    pub fn key_versions_are_unique_and_ordered(b: &dyn Backend) {
        let store = b.open();
        store.insert_key_version(2, b"w2", &mut || Ok(())).unwrap();
        store.insert_key_version(1, b"w1", &mut || Ok(())).unwrap();
        let err = store
            .insert_key_version(2, b"again", &mut || panic!("gate after a conflict"))
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err}");
        let versions = store.key_versions().unwrap();
        let got: Vec<_> = versions.iter().map(|(v, w, _)| (*v, w.clone())).collect();
        assert_eq!(got, [(1, b"w1".to_vec()), (2, b"w2".to_vec())]);
        assert!(versions.iter().all(|(_, _, at)| *at > 1_700_000_000));
    }

    /// The one-read keyring check sees every change another replica makes
    /// (a new key version, min_decrypt_version), so none is missed.
    pub fn keyring_state_follows_keys_and_the_floor(b: &dyn Backend) {
        let (a, other) = (b.open(), b.open());
        let state = |s: &dyn VaultStore| s.keyring_state("min_decrypt_version").unwrap();
        assert_eq!(
            state(&*a),
            KeyringState {
                versions: 0,
                newest: 0,
                setting: None
            }
        );
        other.insert_key_version(1, b"w1", &mut || Ok(())).unwrap();
        other.insert_key_version(2, b"w2", &mut || Ok(())).unwrap();
        assert_eq!((state(&*a).versions, state(&*a).newest), (2, 2));
        other
            .set_setting("min_decrypt_version", 2, &mut || Ok(()))
            .unwrap();
        assert_eq!(
            state(&*a),
            KeyringState {
                versions: 2,
                newest: 2,
                setting: Some(2)
            }
        );
    }

    fn new_lease(holder: &str) -> NewLease {
        NewLease {
            credential_id: CredentialId::generate(),
            tenant_id: tenant("acme"),
            holder: holder.to_owned(),
        }
    }

    pub fn leases_grant_release_revoke_and_the_cap(b: &dyn Backend) {
        let leases = b.leases();
        let hour = Duration::from_secs(3600);
        let ids: Vec<LeaseId> = (0..3).map(|_| LeaseId::generate()).collect();
        let first = new_lease("spiffe://recvault/uploader");
        assert!(leases.grant(&ids[0], &first, hour, 3).unwrap());
        for id in &ids[1..] {
            assert!(leases.grant(id, &new_lease("u"), hour, 3).unwrap());
        }
        assert_eq!(leases.active().unwrap(), 3);
        assert!(
            !leases
                .grant(&LeaseId::generate(), &new_lease("u"), hour, 3)
                .unwrap(),
            "the cap holds"
        );
        assert_eq!(leases.active().unwrap(), 3);

        assert_eq!(
            leases.release(&ids[0], "someone-else").unwrap(),
            Err(LeaseProblem::NotHolder)
        );
        assert_eq!(
            leases
                .release(&ids[0], "spiffe://recvault/uploader")
                .unwrap(),
            Ok(first.clone())
        );
        assert_eq!(
            leases
                .release(&ids[0], "spiffe://recvault/uploader")
                .unwrap(),
            Err(LeaseProblem::Unknown)
        );
        leases.revoke(&ids[1]).unwrap();
        leases.revoke(&ids[1]).unwrap();
        assert_eq!(
            leases.release(&ids[1], "u").unwrap(),
            Err(LeaseProblem::Unknown)
        );
        assert_eq!(leases.active().unwrap(), 1);
        assert!(
            leases
                .grant(&LeaseId::generate(), &new_lease("u"), hour, 3)
                .unwrap()
        );
        assert_eq!(leases.active().unwrap(), 2);
    }

    pub fn an_expired_lease_is_refused_once_then_forgotten(b: &dyn Backend) {
        let leases = b.leases();
        let id = LeaseId::generate();
        assert!(
            leases
                .grant(&id, &new_lease("u"), Duration::ZERO, 10)
                .unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            leases.release(&id, "u").unwrap(),
            Err(LeaseProblem::Expired)
        );
        assert_eq!(
            leases.release(&id, "u").unwrap(),
            Err(LeaseProblem::Unknown)
        );

        // Expired leases do not hold places under the cap, swept or not.
        let short: Vec<LeaseId> = (0..3).map(|_| LeaseId::generate()).collect();
        for id in &short {
            assert!(
                leases
                    .grant(id, &new_lease("u"), Duration::ZERO, 3)
                    .unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
        let kept = LeaseId::generate();
        assert!(
            leases
                .grant(&kept, &new_lease("u"), Duration::from_secs(60), 3)
                .unwrap()
        );
        leases.sweep().unwrap();
        assert_eq!(leases.active().unwrap(), 1);
        assert_eq!(
            leases.release(&short[1], "u").unwrap(),
            Err(LeaseProblem::Unknown)
        );
        assert!(leases.release(&kept, "u").unwrap().is_ok());
        assert_eq!(leases.active().unwrap(), 0);
    }

    pub fn a_lease_from_one_replica_is_released_on_another(b: &dyn Backend) {
        let (a, other) = (b.leases(), b.leases());
        let id = LeaseId::generate();
        let lease = new_lease("u");
        assert!(a.grant(&id, &lease, Duration::from_secs(60), 10).unwrap());
        assert_eq!(other.active().unwrap(), 1);
        assert_eq!(other.release(&id, "u").unwrap(), Ok(lease));
        // Released is released everywhere.
        assert_eq!(a.release(&id, "u").unwrap(), Err(LeaseProblem::Unknown));
        assert_eq!(other.release(&id, "u").unwrap(), Err(LeaseProblem::Unknown));
    }

    pub fn settings_and_tenant_limits(b: &dyn Backend) {
        let store = b.open();
        let acme = tenant("acme");
        assert_eq!(store.setting("min_decrypt_version").unwrap(), None);
        store
            .set_setting("min_decrypt_version", 2, &mut || Ok(()))
            .unwrap();
        store
            .set_setting("min_decrypt_version", 3, &mut || Ok(()))
            .unwrap();
        assert_eq!(store.setting("min_decrypt_version").unwrap(), Some(3));

        assert_eq!(store.tenant_limit(&acme).unwrap(), None);
        store
            .set_tenant_limit(&acme, Some(100), &mut || Ok(()))
            .unwrap();
        store
            .set_tenant_limit(&acme, Some(200), &mut || Ok(()))
            .unwrap();
        assert_eq!(store.tenant_limit(&acme).unwrap(), Some(200));
        assert_eq!(store.tenant_limit(&tenant("globex")).unwrap(), None);
        store.set_tenant_limit(&acme, None, &mut || Ok(())).unwrap();
        assert_eq!(store.tenant_limit(&acme).unwrap(), None);

        store
            .set_tenant_limit(&acme, Some(5), &mut || Ok(()))
            .unwrap();
        drop(store);
        let reopened = b.open();
        assert_eq!(reopened.tenant_limit(&acme).unwrap(), Some(5));
        assert_eq!(reopened.setting("min_decrypt_version").unwrap(), Some(3));
    }
}

/// One `#[test]` per suite function for the backend `$make` opens (`None`:
/// the backend cannot run on this machine, and `$make` said why).
macro_rules! conformance_suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            conformance_suite!(@tests $make;
                put_then_get_and_list,
                the_put_gate_sees_the_new_id_and_version,
                a_failed_gate_rolls_every_change_back,
                a_failed_seal_stores_nothing_and_skips_the_gate,
                delete_shreds_and_keeps_a_tombstone,
                rewrap_skips_rows_a_put_changed,
                key_versions_are_unique_and_ordered,
                keyring_state_follows_keys_and_the_floor,
                settings_and_tenant_limits,
                leases_grant_release_revoke_and_the_cap,
                an_expired_lease_is_refused_once_then_forgotten,
                a_lease_from_one_replica_is_released_on_another,
            );
        }
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if let Some(backend) = $make {
                    super::suite::$name(&backend);
                }
            }
        )*
    };
}

conformance_suite!(sqlite, sqlite());
conformance_suite!(postgres, postgres());
