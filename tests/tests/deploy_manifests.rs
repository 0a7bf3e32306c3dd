//! deploy/ as CI checks it (issue 4 item 6):
//! - Kubernetes: every kustomization renders (`kubectl kustomize` when the
//!   machine has a kubectl with kustomize v4+, else a small built-in renderer)
//!   and passes `deploy/kubernetes/check_manifests.py validate`: the Kubernetes
//!   OpenAPI schemas bundled in kubernetes-validate (PyPI, strict), a structural
//!   cert-manager.io/v1 schema, and recvault's rules (security context, master
//!   key mode, identities, config paths, network policy).
//! - systemd: `systemd-analyze verify` (with ExecStart pointed at the built
//!   binaries, since verify checks that they exist), `systemd-analyze security
//!   --offline` under an exposure threshold, and the sysusers file.
//! - The configs the manifests and units ship start the real binaries; the
//!   Kubernetes ones answer the kubelet's probe (plaintext gRPC health check)
//!   on their health port, and the mTLS API port refuses it.
//!
//! Each validator is also fed broken input and must reject it, so none of these
//! checks can pass by checking nothing. Tools are installed on first use:
//! kubernetes-validate with pip into `target/tools/kubernetes-validate`, systemd
//! with apt-get only when `systemd-analyze` is missing and we are root. A missing
//! tool fails the test; it never skips.

#![allow(clippy::unwrap_used)]

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::Mutex,
    time::Duration,
};

use recvault_tests::{Daemon, binary, grpcurl, grpcurl_call, served_addr, workspace_root};

fn deploy() -> PathBuf {
    workspace_root().join("deploy")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command, what: &str) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

/// `name` on `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// Tools

/// `PYTHONPATH` holding kubernetes-validate (and its PyYAML and jsonschema),
/// installed from PyPI on first use into a scratch directory, then renamed
/// into place so a concurrent test never sees half an install.
fn kubernetes_validate() -> PathBuf {
    let tools = workspace_root().join("target/tools");
    let dir = tools.join("kubernetes-validate");
    let installed = |d: &Path| {
        d.join("kubernetes_validate").is_dir()
            && d.join("yaml").is_dir()
            && d.join("jsonschema").is_dir()
    };
    static INSTALL: Mutex<()> = Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if installed(&dir) {
        return dir;
    }
    fs::create_dir_all(&tools).unwrap();
    let scratch = tools.join(format!(
        "kubernetes-validate.partial-{}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&scratch);
    let out = run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&scratch)
            .arg("kubernetes-validate"),
        "python3 -m pip (Debian: apt-get install python3-pip)",
    );
    assert!(
        out.status.success(),
        "pip install kubernetes-validate failed:\n{}",
        text(&out)
    );
    let _ = fs::remove_dir_all(&dir);
    if fs::rename(&scratch, &dir).is_err() {
        // Another process installed it first.
        let _ = fs::remove_dir_all(&scratch);
    }
    assert!(
        installed(&dir),
        "kubernetes-validate not found in {}",
        dir.display()
    );
    dir
}

/// A kubectl whose embedded kustomize is v4 or newer (`$KUBECTL` or `PATH`).
/// Debian's kubernetes-client is 1.20 (kustomize v2), too old for `patches`,
/// so it is not installed; without one the built-in renderer is used.
fn kubectl() -> Option<PathBuf> {
    if std::env::var_os("RECVAULT_DEPLOY_NO_KUBECTL").is_some() {
        return None;
    }
    let path = std::env::var_os("KUBECTL")
        .map(PathBuf::from)
        .or_else(|| which("kubectl"))?;
    let out = Command::new(&path)
        .args(["version", "--client"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let version = String::from_utf8_lossy(&out.stdout).into_owned();
    let kustomize = version
        .lines()
        .find_map(|l| l.strip_prefix("Kustomize Version: v"))?;
    let major: u32 = kustomize.split('.').next()?.parse().ok()?;
    (major >= 4).then_some(path)
}

/// `systemd-analyze`; installed with apt-get (Debian package `systemd`) only
/// when missing and running as root.
fn systemd_tool(name: &str) -> PathBuf {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = which(name) {
        return p;
    }
    assert!(
        is_root(),
        "{name} is missing: install the Debian package `systemd` (apt-get install systemd)"
    );
    let out = run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "systemd"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get",
    );
    assert!(
        out.status.success(),
        "apt-get install systemd failed:\n{}",
        text(&out)
    );
    which(name).unwrap_or_else(|| panic!("{name} still missing after apt-get install systemd"))
}

// ---------------------------------------------------------------------------
// Kubernetes

fn checker(args: &[&Path]) -> (bool, String) {
    let out = run(
        Command::new("python3")
            .arg(deploy().join("kubernetes/check_manifests.py"))
            .args(args)
            .env("PYTHONPATH", kubernetes_validate()),
        "python3 deploy/kubernetes/check_manifests.py",
    );
    (out.status.success(), text(&out))
}

/// The kustomization in `dir` rendered to YAML, or None when it needs
/// kustomize and the machine has none.
fn render(dir: &Path) -> Option<String> {
    let out = match kubectl() {
        Some(kubectl) => run(
            Command::new(kubectl).arg("kustomize").arg(dir),
            "kubectl kustomize",
        ),
        None => {
            let out = run(
                Command::new("python3")
                    .arg(deploy().join("kubernetes/check_manifests.py"))
                    .arg("render")
                    .arg(dir)
                    .env("PYTHONPATH", kubernetes_validate()),
                "check_manifests.py render",
            );
            if out.status.code() == Some(3) {
                return None;
            }
            out
        }
    };
    assert!(
        out.status.success(),
        "rendering {} failed:\n{}",
        dir.display(),
        text(&out)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

/// Every entry point a user applies: the default and the opt-in overlay.
const KUSTOMIZATIONS: [&str; 2] = ["kubernetes", "kubernetes/overlays/ipc-lock"];

#[test]
fn kubernetes_manifests_pass_kubernetes_validate_and_recvault_rules() {
    let (ok, out) = checker(&[Path::new("tree"), &deploy().join("kubernetes")]);
    assert!(ok, "kustomization tree check failed:\n{out}");
    eprintln!("{}", out.trim());

    let tmp = tempfile::tempdir().unwrap();
    let mut validated = 0;
    for k in KUSTOMIZATIONS {
        let Some(yaml) = render(&deploy().join(k)) else {
            eprintln!(
                "deploy/{k}: needs kustomize (no kubectl with kustomize v4+ here); its resources are validated through deploy/kubernetes"
            );
            continue;
        };
        let file = tmp.path().join(format!("{}.yaml", k.replace('/', "_")));
        fs::write(&file, &yaml).unwrap();
        let (ok, out) = checker(&[Path::new("validate"), &file]);
        assert!(ok, "deploy/{k} failed validation:\n{out}");
        eprintln!("deploy/{k}: {}", out.trim());
        validated += 1;
    }
    assert!(validated >= 1, "nothing was validated");
}

/// Python run against the rendered manifests before they are checked. Helpers:
/// `find(kind, name)`, `cm(prefix)` (ConfigMaps carry a hash suffix),
/// `pod(name)`, `container(name)` (the workload's main container).
const MUTATE: &str = r#"
import sys, yaml
src, out = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(src)) if d]
def find(kind, name): return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)
def cm(prefix): return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix))
def workload(name): return next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == name)
def pod(name): return workload(name)["spec"]["template"]["spec"]
def container(name): return pod(name)["containers"][0]
def sc(name): return container(name)["securityContext"]
exec(sys.stdin.read())
yaml.safe_dump_all(docs, open(out, "w"), sort_keys=False)
"#;

/// (what is broken, Python that breaks it, what the checker must say).
const BROKEN: &[(&str, &str, &str)] = &[
    (
        "wrong type (Kubernetes schema)",
        "sc('recvault-vault')['readOnlyRootFilesystem'] = 'yes'",
        "is not of type 'boolean'",
    ),
    (
        "unknown field (strict Kubernetes schema)",
        "find('Service', 'recvault-vault')['spec']['clusterIPz'] = 'None'",
        "Additional properties are not allowed",
    ),
    (
        "privilege escalation allowed",
        "sc('recvault-vault')['allowPrivilegeEscalation'] = True",
        "allowPrivilegeEscalation must be false",
    ),
    (
        "may run as root",
        "pod('recvault-uploader')['securityContext']['runAsNonRoot'] = False; del sc('recvault-uploader')['runAsNonRoot']",
        "runAsNonRoot must be true",
    ),
    (
        "extra capability",
        "sc('recvault-uploader')['capabilities']['add'] = ['SYS_ADMIN']",
        "capabilities.add ['SYS_ADMIN']",
    ),
    (
        "writable root filesystem in the init container",
        "pod('recvault-vault')['initContainers'][0]['securityContext']['readOnlyRootFilesystem'] = False",
        "initContainer master-key: readOnlyRootFilesystem must be true",
    ),
    (
        "Burstable QoS (could be swapped)",
        "container('recvault-vault')['resources']['limits']['memory'] = '1Gi'",
        "Guaranteed QoS",
    ),
    (
        "master key Secret group-readable",
        "next(v for v in pod('recvault-vault')['volumes'] if v['name'] == 'master-key-secret')['secret']['defaultMode'] = 0o440",
        "defaultMode must be 0400",
    ),
    (
        "vaultd reads the Secret volume itself",
        "container('recvault-vault')['volumeMounts'].append({'name': 'master-key-secret', 'mountPath': '/secret', 'readOnly': True})",
        "must not mount the master key Secret",
    ),
    (
        "master key on disk",
        "next(v for v in pod('recvault-vault')['volumes'] if v['name'] == 'master-key')['emptyDir'] = {}",
        "memory-backed emptyDir",
    ),
    (
        "uploaderd reads the audit key Secret volume itself",
        "container('recvault-uploader')['volumeMounts'].append({'name': 'audit-key-secret', 'mountPath': '/secret', 'readOnly': True})",
        "uploaderd must not mount the audit key Secret",
    ),
    (
        "audit key copied without chmod 0400",
        "pod('recvault-uploader')['initContainers'][0]['command'][2] = pod('recvault-uploader')['initContainers'][0]['command'][2].replace('chmod 0400', 'chmod 0440')",
        "the init container must make the audit key copy mode 0400",
    ),
    (
        "vault reachable from every pod in the namespace",
        "find('NetworkPolicy', 'recvault-vault')['spec']['ingress'][0]['from'] = [{'podSelector': {}}]",
        "is not exactly the uploader pods",
    ),
    (
        "another policy opens the vault",
        "docs.append({'apiVersion': 'networking.k8s.io/v1', 'kind': 'NetworkPolicy', 'metadata': {'name': 'open', 'namespace': 'recvault'}, 'spec': {'podSelector': {'matchLabels': {'app.kubernetes.io/name': 'recvault-vault'}}, 'ingress': [{}]}})",
        "admits every source",
    ),
    (
        "a port range over the API port opened to every namespace",
        "find('NetworkPolicy', 'recvault-vault')['spec']['ingress'].append({'from': [{'namespaceSelector': {}}], 'ports': [{'port': 7000, 'endPort': 8000}]})",
        "is not exactly the uploader pods",
    ),
    (
        "metrics on all interfaces but no container port",
        "container('recvault-uploader')['ports'] = [p for p in container('recvault-uploader')['ports'] if p['name'] != 'metrics']",
        "is not loopback, so it must be a containerPort",
    ),
    (
        "vault may dial out anywhere",
        "find('NetworkPolicy', 'recvault-vault')['spec']['egress'] = [{}]",
        "the vault may reach only DNS (53) and PostgreSQL (TCP 5432)",
    ),
    (
        "vault may dial out over HTTPS",
        "find('NetworkPolicy', 'recvault-vault')['spec']['egress'].append({'ports': [{'protocol': 'TCP', 'port': 443}]})",
        "the vault may reach only DNS (53) and PostgreSQL (TCP 5432)",
    ),
    (
        "wrong identity in the vault certificate",
        "find('Certificate', 'recvault-vault')['spec']['uris'] = ['spiffe://recvault.local/manager']",
        "uris must be exactly [spiffe://recvault.local/vault]",
    ),
    (
        "invalid cert-manager field",
        "find('Certificate', 'recvault-uploader')['spec']['usages'].append('server-auth')",
        "cert-manager.io/v1 schema",
    ),
    (
        "uploader expects a name the vault certificate lacks",
        "c = cm('recvault-uploader-config'); c['data']['uploader.toml'] = c['data']['uploader.toml'].replace('server_name = \"recvault-vault.recvault.svc\"', 'server_name = \"vault.example.com\"')",
        "is not a dnsName of the vault's Certificate",
    ),
    (
        // The uploader's audit log lives in PostgreSQL now: a local file (here
        // on the ephemeral /tmp) would be lost with its pod.
        "uploader audit log in a local file on the ephemeral /tmp",
        "c = cm('recvault-uploader-config'); c['data']['uploader.toml'] = c['data']['uploader.toml'].replace('audit_key_file = ', 'audit_database = \"/tmp/audit.db\"\\naudit_key_file = ', 1)",
        "audit_database = /tmp/audit.db: the uploader replicas' audit log lives in PostgreSQL",
    ),
    (
        "one vault replica (no availability through a drain)",
        "workload('recvault-vault')['spec']['replicas'] = 1",
        "the vault needs at least 2 replicas, got 1",
    ),
    (
        "no PodDisruptionBudget for the vault",
        "docs[:] = [d for d in docs if d['kind'] != 'PodDisruptionBudget']",
        "expected one PodDisruptionBudget selecting the vault, got 0",
    ),
    (
        "a PodDisruptionBudget that blocks every drain",
        "find('PodDisruptionBudget', 'recvault-vault')['spec']['minAvailable'] = 2",
        "must keep at least one vault serving and let a drain proceed",
    ),
    (
        "vault replicas on SQLite files",
        "c = cm('recvault-vault-config'); c['data']['vault.toml'] = c['data']['vault.toml'].replace('database_url_file = \"/run/recvault/database/database.url\"', 'database = \"/tmp/vault.db\"')",
        "several vault replicas need database_url_file (PostgreSQL), not database (a SQLite file)",
    ),
    (
        "vaultd reads the database URL Secret volume itself",
        "container('recvault-vault')['volumeMounts'].append({'name': 'database-secret', 'mountPath': '/secret', 'readOnly': True})",
        "vaultd must not mount the database URL Secret",
    ),
    (
        "database URL on disk",
        "next(v for v in pod('recvault-vault')['volumes'] if v['name'] == 'database')['emptyDir'] = {}",
        "the database URL must be on a memory-backed emptyDir",
    ),
    (
        "vault replicas on one node",
        "del pod('recvault-vault')['topologySpreadConstraints']",
        "the vault replicas must spread over nodes",
    ),
    (
        "a rollout that takes a vault down before its replacement is ready",
        "workload('recvault-vault')['spec']['strategy']['rollingUpdate']['maxUnavailable'] = 1",
        "a rollout must start a new vault pod before it stops an old one",
    ),
    (
        "one uploader replica",
        "workload('recvault-uploader')['spec']['replicas'] = 1",
        "the uploader needs at least 2 replicas, got 1",
    ),
    (
        "uploader back on a StatefulSet",
        "w = workload('recvault-uploader'); w['kind'] = 'StatefulSet'; w['spec']['serviceName'] = 'recvault-uploader'; del w['spec']['strategy']",
        "StatefulSet/recvault-uploader: the uploader must be a Deployment",
    ),
    (
        "uploader state on a volume claim template (the old StatefulSet)",
        "w = workload('recvault-uploader'); w['kind'] = 'StatefulSet'; w['spec']['serviceName'] = 'recvault-uploader'; del w['spec']['strategy']; w['spec']['volumeClaimTemplates'] = [{'metadata': {'name': 'data'}, 'spec': {'accessModes': ['ReadWriteOnce'], 'resources': {'requests': {'storage': '100Gi'}}}}]; container('recvault-uploader')['volumeMounts'].append({'name': 'data', 'mountPath': '/var/lib/recvault/uploader'})",
        "the uploader must keep no state in its pods (it lives in PostgreSQL and the backup bucket): no PersistentVolumeClaim (volumeClaimTemplates or persistentVolumeClaim volumes), got ['data']",
    ),
    (
        "uploader state on a PersistentVolumeClaim",
        "pod('recvault-uploader')['volumes'].append({'name': 'data', 'persistentVolumeClaim': {'claimName': 'recvault-uploader-data'}}); container('recvault-uploader')['volumeMounts'].append({'name': 'data', 'mountPath': '/var/lib/recvault/uploader'})",
        "Deployment/recvault-uploader: the uploader must keep no state in its pods",
    ),
    (
        "a rollout that stops every uploader first",
        "workload('recvault-uploader')['spec']['strategy'] = {'type': 'Recreate'}",
        "a rollout must start a new uploader pod before it stops an old one",
    ),
    (
        "uploader replicas on one node",
        "del pod('recvault-uploader')['topologySpreadConstraints']",
        "the uploader replicas must spread over nodes",
    ),
    (
        "no PodDisruptionBudget for the uploader",
        "docs[:] = [d for d in docs if not (d['kind'] == 'PodDisruptionBudget' and d['metadata']['name'] == 'recvault-uploader')]",
        "expected one PodDisruptionBudget selecting the uploader, got 0",
    ),
    (
        "an uploader PodDisruptionBudget that blocks every drain",
        "find('PodDisruptionBudget', 'recvault-uploader')['spec']['minAvailable'] = 2",
        "must keep at least one uploader serving and let a drain proceed",
    ),
    (
        "an uploader PodDisruptionBudget that keeps none serving",
        "find('PodDisruptionBudget', 'recvault-uploader')['spec']['minAvailable'] = 0",
        "must keep at least one uploader serving and let a drain proceed",
    ),
    (
        "one PodDisruptionBudget over every recvault pod",
        "find('PodDisruptionBudget', 'recvault-uploader')['spec']['selector'] = {'matchLabels': {'app.kubernetes.io/part-of': 'recvault'}}",
        "PodDisruptionBudget/recvault-uploader: must select exactly the uploader pods, it also selects the vault pods",
    ),
    (
        "uploader replicas on SQLite files",
        "c = cm('recvault-uploader-config'); c['data']['uploader.toml'] = c['data']['uploader.toml'].replace('database_url_file = \"/run/recvault/database/database.url\"', 'database = \"/tmp/uploader.db\"')",
        "several uploader replicas need database_url_file (PostgreSQL), not database (a SQLite file)",
    ),
    (
        "uploaderd reads the database URL Secret volume itself",
        "container('recvault-uploader')['volumeMounts'].append({'name': 'database-secret', 'mountPath': '/secret', 'readOnly': True})",
        "uploaderd must not mount the database URL Secret",
    ),
    (
        "uploader database URL on disk",
        "next(v for v in pod('recvault-uploader')['volumes'] if v['name'] == 'database')['emptyDir'] = {}",
        "Deployment/recvault-uploader container uploaderd: the database URL must be on a memory-backed emptyDir",
    ),
    (
        "uploader database URL mounted writable",
        "next(m for m in container('recvault-uploader')['volumeMounts'] if m['name'] == 'database')['readOnly'] = False",
        "Deployment/recvault-uploader container uploaderd: the database URL mount must be readOnly",
    ),
    (
        "uploader database URL copied without chmod 0400",
        "i = next(i for i in pod('recvault-uploader')['initContainers'] if i['name'] == 'database-url'); i['command'][2] = i['command'][2].replace('chmod 0400', 'chmod 0644')",
        "the init container must make the database URL copy mode 0400",
    ),
    (
        "the uploader on the vault's database",
        "next(v for v in pod('recvault-uploader')['volumes'] if v['name'] == 'database-secret')['secret']['secretName'] = 'recvault-vault-database'",
        "Secret recvault-vault-database: is mounted by both the vault and the uploader",
    ),
    (
        "backup bucket credentials Secret group-readable",
        "next(v for v in pod('recvault-uploader')['volumes'] if v['name'] == 'backup-store-secret')['secret']['defaultMode'] = 0o440",
        "backup store credentials Secret defaultMode must be 0400",
    ),
    (
        "uploaderd reads the backup bucket credentials Secret volume itself",
        "container('recvault-uploader')['volumeMounts'].append({'name': 'backup-store-secret', 'mountPath': '/secret', 'readOnly': True})",
        "uploaderd must not mount the backup store credentials Secret",
    ),
    (
        "backup bucket credentials on disk",
        "next(v for v in pod('recvault-uploader')['volumes'] if v['name'] == 'backup-store')['emptyDir'] = {}",
        "the backup store credentials must be on a memory-backed emptyDir",
    ),
    (
        "backup bucket credentials mounted writable",
        "next(m for m in container('recvault-uploader')['volumeMounts'] if m['name'] == 'backup-store')['readOnly'] = False",
        "the backup store credentials mount must be readOnly",
    ),
    (
        "no init container copies the backup bucket credentials",
        "pod('recvault-uploader')['initContainers'] = [i for i in pod('recvault-uploader')['initContainers'] if i['name'] != 'backup-store-credentials']",
        "an initContainer must copy the backup store credentials from the Secret into the emptyDir",
    ),
    (
        "backups in a local directory again",
        "c = cm('recvault-uploader-config'); c['data']['uploader.toml'] = c['data']['uploader.toml'].replace('policy_file = ', 'backup_dir = \"/tmp/backups\"\\npolicy_file = ', 1)",
        "backup_dir = /tmp/backups: the replicas keep their backups in the [backup_store] bucket",
    ),
    (
        "no backup bucket",
        "c = cm('recvault-uploader-config'); t = c['data']['uploader.toml']; i = t.index('[backup_store]'); j = t.index('\\n[', i); c['data']['uploader.toml'] = t[:i] + t[j + 1:]",
        "config has no [backup_store] table",
    ),
    (
        "backup bucket without its credentials",
        "c = cm('recvault-uploader-config'); c['data']['uploader.toml'] = ''.join(l for l in c['data']['uploader.toml'].splitlines(True) if not l.startswith('credentials_file'))",
        "[backup_store] credentials_file must be set",
    ),
    (
        "backup bucket over plain HTTP",
        "c = cm('recvault-uploader-config'); c['data']['uploader.toml'] = c['data']['uploader.toml'].replace('endpoint = \"https://s3.', 'endpoint = \"http://s3.')",
        "[backup_store] endpoint 'http://s3.eu-central-1.amazonaws.com' must be https://",
    ),
    (
        "uploader may dial out anywhere",
        "find('NetworkPolicy', 'recvault-uploader')['spec']['egress'].append({})",
        "the uploader may reach only DNS (53), the vault (TCP 7443), PostgreSQL (TCP 5432) and HTTPS (TCP 443): egress rule with ports all",
    ),
    (
        "uploader may dial out over SSH",
        "find('NetworkPolicy', 'recvault-uploader')['spec']['egress'].append({'ports': [{'protocol': 'TCP', 'port': 22}]})",
        "egress rule with ports [('TCP', 22)]",
    ),
    (
        "uploader may reach port 7443 anywhere",
        "find('NetworkPolicy', 'recvault-uploader')['spec']['egress'].append({'ports': [{'protocol': 'TCP', 'port': 7443}]})",
        "uploader egress to port 7443 must go to the vault pods only",
    ),
    (
        "uploader cannot reach its PostgreSQL",
        "e = find('NetworkPolicy', 'recvault-uploader')['spec']['egress']; e[:] = [r for r in e if all(p.get('port') != 5432 for p in r.get('ports') or [])]",
        "uploader egress must allow its PostgreSQL database (TCP 5432)",
    ),
    (
        "uploader egress unrestricted",
        "n = find('NetworkPolicy', 'recvault-uploader')['spec']; n['policyTypes'] = ['Ingress']; del n['egress']; find('NetworkPolicy', 'recvault-default-deny')['spec']['policyTypes'] = ['Ingress']",
        "uploader egress is not restricted",
    ),
    (
        "invalid TOML in a ConfigMap",
        "c = cm('recvault-vault-config'); c['data']['vault.toml'] += '\\n[tls\\n'",
        "is not valid TOML",
    ),
    (
        "kubelet gRPC probe on the mTLS port",
        "container('recvault-vault')['readinessProbe'] = {'grpc': {'port': 7443}}",
        "cannot pass the mTLS-only port",
    ),
    (
        "a TCP probe instead of a gRPC one (the old stopgap)",
        "container('recvault-uploader')['livenessProbe'] = {'tcpSocket': {'port': 'health'}}",
        "livenessProbe must be a kubelet gRPC probe",
    ),
    (
        "health_listen moved, the probes not",
        "c = cm('recvault-vault-config'); c['data']['vault.toml'] = c['data']['vault.toml'].replace('health_listen = \"0.0.0.0:7453\"', 'health_listen = \"0.0.0.0:7455\"'); next(p for p in container('recvault-vault')['ports'] if p['name'] == 'health')['containerPort'] = 7455",
        "readinessProbe: grpc.port 7453 is not the health_listen port 7455",
    ),
    (
        "health port not declared as a containerPort",
        "container('recvault-uploader')['ports'] = [p for p in container('recvault-uploader')['ports'] if p['name'] != 'health']",
        "the health_listen port 7454 is not a containerPort",
    ),
    (
        "no health_listen in the config",
        "c = cm('recvault-vault-config'); c['data']['vault.toml'] = ''.join(l for l in c['data']['vault.toml'].splitlines(True) if not l.startswith('health_listen'))",
        "health_listen must be set",
    ),
    (
        "health port on loopback (the kubelet probes the pod IP)",
        "c = cm('recvault-uploader-config'); c['data']['uploader.toml'] = c['data']['uploader.toml'].replace('health_listen = \"0.0.0.0:7454\"', 'health_listen = \"127.0.0.1:7454\"')",
        "must accept the kubelet, which probes the pod IP",
    ),
    (
        "health port shared with metrics",
        "c = cm('recvault-uploader-config'); c['data']['uploader.toml'] = c['data']['uploader.toml'].replace('health_listen = \"0.0.0.0:7454\"', 'health_listen = \"0.0.0.0:9444\"')",
        "needs a fixed port of its own",
    ),
    (
        "probe asks for a service the binary does not report",
        "container('recvault-vault')['readinessProbe']['grpc']['service'] = 'recvault.vault.v1.Vault'",
        "grpc.service 'recvault.vault.v1.Vault' is not a service the binary reports",
    ),
    (
        "health port published by the Service",
        "find('Service', 'recvault-vault')['spec']['ports'].append({'name': 'health', 'port': 7453, 'targetPort': 'health', 'protocol': 'TCP'})",
        "targetPort health is not the API port 7443",
    ),
    (
        "a Secret in the manifests",
        "docs.append({'apiVersion': 'v1', 'kind': 'Secret', 'metadata': {'name': 'recvault-master-key', 'namespace': 'recvault'}, 'stringData': {'master.key': '00' * 32}})",
        "Secrets must not be in the manifests",
    ),
    (
        "plaintext leases granted to the manager",
        "c = cm('recvault-vault-config'); c['data']['vault-policy.toml'] += '\\n[[grant]]\\nidentity = \"spiffe://recvault.local/manager\"\\nroles = [\"uploader\"]\\n'",
        "may hold the uploader role",
    ),
    (
        "IPC_LOCK in a namespace that enforces restricted",
        "sc('recvault-vault')['capabilities']['add'] = ['IPC_LOCK']",
        "enforce must be privileged",
    ),
];

#[test]
fn kubernetes_validation_rejects_broken_manifests() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(yaml) = render(&deploy().join("kubernetes")) else {
        panic!("deploy/kubernetes must render without kustomize-only features");
    };
    let good = tmp.path().join("good.yaml");
    fs::write(&good, yaml).unwrap();
    let pythonpath = kubernetes_validate();

    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = BROKEN
            .iter()
            .enumerate()
            .map(|(i, (what, python, expected))| {
                let (good, pythonpath, dir) = (&good, &pythonpath, tmp.path());
                s.spawn(move || {
                    let bad = dir.join(format!("broken-{i}.yaml"));
                    let mut child = Command::new("python3")
                        .args(["-c", MUTATE])
                        .arg(good)
                        .arg(&bad)
                        .env("PYTHONPATH", pythonpath)
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .unwrap();
                    child
                        .stdin
                        .take()
                        .unwrap()
                        .write_all(python.as_bytes())
                        .unwrap();
                    let out = child.wait_with_output().unwrap();
                    assert!(
                        out.status.success(),
                        "mutation {what:?} failed:\n{}",
                        text(&out)
                    );
                    let (ok, out) = checker(&[Path::new("validate"), &bad]);
                    if ok {
                        Some(format!("{what}: accepted, but must be rejected:\n{out}"))
                    } else if !out.contains(expected) {
                        Some(format!("{what}: rejected without {expected:?}:\n{out}"))
                    } else {
                        None
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // The tree check: a manifest nobody lists, and a listed file that is gone.
    let copy = tmp.path().join("kubernetes");
    copy_dir(&deploy().join("kubernetes"), &copy);
    fs::write(
        copy.join("base/forgotten.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    )
    .unwrap();
    fs::remove_file(copy.join("base/networkpolicy.yaml")).unwrap();
    // An overlay still patching the uploader as a StatefulSet: kustomize skips
    // a patch whose target matches nothing, so IPC_LOCK would silently vanish.
    let overlay = copy.join("overlays/ipc-lock/kustomization.yaml");
    let patched = fs::read_to_string(&overlay).unwrap();
    let stale = patched.replace(
        "kind: Deployment\n      name: recvault-uploader",
        "kind: StatefulSet\n      name: recvault-uploader",
    );
    assert_ne!(
        stale, patched,
        "the ipc-lock overlay no longer patches the uploader Deployment"
    );
    fs::write(&overlay, stale).unwrap();
    let (ok, out) = checker(&[Path::new("tree"), &copy]);
    assert!(
        !ok,
        "the tree check accepted an unlisted and a missing file and a stale patch target:\n{out}"
    );
    assert!(out.contains("base/forgotten.yaml: is not listed"), "{out}");
    assert!(
        out.contains("resource networkpolicy.yaml does not exist"),
        "{out}"
    );
    assert!(
        out.contains("patch target StatefulSet/recvault-uploader matches no resource"),
        "{out}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            if entry.file_name() != "__pycache__" {
                copy_dir(&entry.path(), &target);
            }
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// systemd

const UNITS: [(&str, &str); 2] = [
    ("recvault-vault.service", "vaultd"),
    ("recvault-uploader.service", "uploaderd"),
];

/// Highest `systemd-analyze security` exposure accepted, ×10 (its --threshold scale).
const MAX_EXPOSURE: u32 = 20;

/// `unit` as shipped, with ExecStart pointed at the built binary (verify checks
/// that the binary exists), written to `dir`.
fn unit_for_verify(dir: &Path, unit: &str, bin: &str) -> PathBuf {
    let shipped = fs::read_to_string(deploy().join("systemd").join(unit)).unwrap();
    let installed = format!("/usr/local/bin/{bin} ");
    assert!(
        shipped.contains(&format!("ExecStart={installed}")),
        "{unit}: ExecStart must run {installed}"
    );
    let built = binary(bin);
    let path = dir.join(unit);
    fs::write(
        &path,
        shipped.replace(&installed, &format!("{} ", built.display())),
    )
    .unwrap();
    path
}

/// `systemd-analyze verify` and `security --offline`: Err with the output if
/// verify fails or prints anything about the unit (it only warns, exit 0, on
/// bad values and unknown keys), or if the exposure is above the threshold.
fn check_unit(path: &Path) -> Result<String, String> {
    let analyze = systemd_tool("systemd-analyze");
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let out = run(
        Command::new(&analyze).arg("verify").arg(path),
        "systemd-analyze verify",
    );
    let complaints: Vec<&str> = std::str::from_utf8(&out.stderr)
        .unwrap()
        .lines()
        .chain(std::str::from_utf8(&out.stdout).unwrap().lines())
        .filter(|l| l.contains(&name))
        .collect();
    if !out.status.success() || !complaints.is_empty() {
        return Err(format!("systemd-analyze verify {name}:\n{}", text(&out)));
    }
    let out = run(
        Command::new(&analyze)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--threshold={MAX_EXPOSURE}"))
            .arg(path),
        "systemd-analyze security",
    );
    let report = text(&out);
    let overall = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("no overall exposure line")
        .to_owned();
    if !out.status.success() {
        return Err(format!(
            "systemd-analyze security {name}: {overall} (threshold {MAX_EXPOSURE}/10):\n{report}"
        ));
    }
    Ok(overall)
}

/// What issue 4 and the brief ask of each unit, as written in the file.
const REQUIRED_DIRECTIVES: &[&str] = &[
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "NoNewPrivileges=yes",
    "LimitCORE=0",
    "MemoryDenyWriteExecute=yes",
    "CapabilityBoundingSet=CAP_IPC_LOCK",
    "AmbientCapabilities=CAP_IPC_LOCK",
    "LimitMEMLOCK=",
    "StateDirectory=recvault/",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter=@system-service",
    "LockPersonality=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "MemorySwapMax=0",
];

#[test]
fn systemd_units_verify_and_are_hardened() {
    let tmp = tempfile::tempdir().unwrap();
    // The users the units run as, created from the shipped sysusers file in a scratch root.
    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("etc/sysusers.d")).unwrap();
    fs::copy(
        deploy().join("systemd/recvault.sysusers.conf"),
        root.join("etc/sysusers.d/recvault.conf"),
    )
    .unwrap();
    let out = run(
        Command::new(systemd_tool("systemd-sysusers")).arg(format!("--root={}", root.display())),
        "systemd-sysusers",
    );
    let complaints = text(&out);
    assert!(
        out.status.success() && !complaints.contains("recvault.conf:"),
        "systemd-sysusers rejected recvault.sysusers.conf:\n{complaints}"
    );
    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();

    for (unit, bin) in UNITS {
        let shipped = fs::read_to_string(deploy().join("systemd").join(unit)).unwrap();
        for d in REQUIRED_DIRECTIVES {
            assert!(
                shipped.lines().any(|l| l.starts_with(d)),
                "{unit} lacks {d}"
            );
        }
        let user = shipped
            .lines()
            .find_map(|l| l.strip_prefix("User="))
            .expect("User=");
        assert!(
            passwd.lines().any(|l| l.starts_with(&format!("{user}:"))),
            "{unit}: User={user} is not in recvault.sysusers.conf"
        );
        assert!(
            shipped.contains(&format!(
                "ExecStart=/usr/local/bin/{bin} serve --config /etc/recvault/"
            )),
            "{unit}: ExecStart must be /usr/local/bin/{bin} serve --config /etc/recvault/…"
        );
        let path = unit_for_verify(tmp.path(), unit, bin);
        match check_unit(&path) {
            Ok(overall) => eprintln!("{unit}: systemd-analyze verify clean; {overall}"),
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn systemd_checks_reject_broken_units() {
    let tmp = tempfile::tempdir().unwrap();
    let good = unit_for_verify(tmp.path(), UNITS[0].0, UNITS[0].1);
    let shipped = fs::read_to_string(&good).unwrap();
    let broken: [(&str, String); 3] = [
        (
            "bad value",
            shipped.replace("ProtectSystem=strict", "ProtectSystem=strictly"),
        ),
        (
            "unknown key",
            shipped.replace("LockPersonality=yes", "LockPersonalty=yes"),
        ),
        (
            "missing binary",
            shipped.replace(
                &binary(UNITS[0].1).display().to_string(),
                "/nonexistent/vaultd",
            ),
        ),
    ];
    for (what, contents) in broken {
        assert_ne!(contents, shipped, "{what}: the mutation changed nothing");
        let dir = tmp.path().join(what.replace(' ', "-"));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(UNITS[0].0);
        fs::write(&path, contents).unwrap();
        assert!(
            check_unit(&path).is_err(),
            "{what}: a broken unit passed the check"
        );
    }
    // Without its sandbox the unit is valid but too exposed.
    let sandbox = [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateIPC",
        "ProtectProc",
        "ProcSubset",
        "ProtectKernel",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictAddressFamilies",
        "SystemCallFilter",
        "CapabilityBoundingSet",
        "NoNewPrivileges",
        "MemoryDenyWriteExecute",
        "PrivateMounts",
        "RestrictSUIDSGID",
    ];
    let bare: String = shipped
        .lines()
        .filter(|l| !sandbox.iter().any(|s| l.starts_with(s)))
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = tmp.path().join("bare");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(UNITS[0].0);
    fs::write(&path, bare).unwrap();
    let err = check_unit(&path).expect_err("an unsandboxed unit passed the exposure threshold");
    assert!(err.contains("Overall exposure level"), "{err}");
}

// ---------------------------------------------------------------------------
// The shipped configs start the real binaries

/// A scratch filesystem root: the config's absolute paths (/etc/recvault,
/// /var/lib/recvault, /run/recvault) are moved under it.
struct Root {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Root {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        Self { _dir: dir, path }
    }

    fn rebase(&self, config: &str) -> String {
        let mut out = config.to_owned();
        for prefix in ["/etc/recvault/", "/var/lib/recvault/", "/run/recvault/"] {
            out = out.replace(
                &format!("\"{prefix}"),
                &format!("\"{}{prefix}", self.path.display()),
            );
        }
        out
    }

    fn file(&self, abs: &str) -> PathBuf {
        let p = self.path.join(abs.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        p
    }

    fn put(&self, abs: &str, contents: &[u8], mode: u32) -> PathBuf {
        let p = self.file(abs);
        fs::write(&p, contents).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn dir(&self, abs: &str) {
        fs::create_dir_all(self.file(abs)).unwrap();
    }
}

struct DevPki {
    _dir: tempfile::TempDir,
    certs: PathBuf,
    master_key: Vec<u8>,
    audit_key: Vec<u8>,
}

/// Dev certificates, a master key and the uploader's audit key, made the way
/// deploy/README.md says: `vaultd init` and `uploaderd init-audit-key` in a
/// scratch directory.
fn dev_pki() -> DevPki {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        Command::new(binary("vaultd"))
            .args(["init", "--listen", "127.0.0.1:0", "--dir"])
            .arg(dir.path().join("vault"))
            .arg("--certs")
            .arg(dir.path().join("certs")),
        "vaultd init",
    );
    assert!(out.status.success(), "vaultd init:\n{}", text(&out));
    let master_key = fs::read(dir.path().join("vault/master.key")).unwrap();
    let out = run(
        Command::new(binary("uploaderd"))
            .args(["init-audit-key", "--file"])
            .arg(dir.path().join("audit.key")),
        "uploaderd init-audit-key",
    );
    assert!(
        out.status.success(),
        "uploaderd init-audit-key:\n{}",
        text(&out)
    );
    let audit_key = fs::read(dir.path().join("audit.key")).unwrap();
    DevPki {
        certs: dir.path().join("certs"),
        _dir: dir,
        master_key,
        audit_key,
    }
}

fn serve(bin: &str, config: &Path, env: &[(&str, String)], ready: &str) -> (Daemon, String) {
    let mut cmd = Command::new(binary(bin));
    // The shipped configs log JSON; text gives the `local_addr=` that served_addr reads.
    cmd.args(["serve", "--log-format", "text", "--config"])
        .arg(config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut daemon = Daemon::spawn(cmd);
    let line = daemon.wait_for(ready, Duration::from_secs(30));
    let addr = served_addr(&line);
    (daemon, addr)
}

/// `grpc.health.v1.Health/Check` as grpcurl needs it: the probe port serves no
/// reflection (only the health service), so the schema comes from a file.
const HEALTH_PROTO: &str = r#"syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health { rpc Check(HealthCheckRequest) returns (HealthCheckResponse); }
"#;

/// The address a service logged in `field=` on the line containing `needle`
/// (the plaintext health port logs `probe_addr=`).
fn logged_addr(daemon: &mut Daemon, needle: &str, field: &str) -> String {
    let line = daemon.wait_for(needle, Duration::from_secs(30));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(field))
        .map(|a| a.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("no {field} in {line:?}"))
}

/// What the kubelet's native gRPC probe does: Health/Check in plaintext, no
/// client certificate. Returns (success, output).
fn plaintext_health_check(proto_dir: &Path, addr: &str, service: &str) -> (bool, String) {
    let out = run(
        Command::new(grpcurl())
            .args(["-plaintext", "-max-time", "10", "-import-path"])
            .arg(proto_dir)
            .args(["-proto", "health.proto", "-d"])
            .arg(format!(r#"{{"service": "{service}"}}"#))
            .arg(addr)
            .arg("grpc.health.v1.Health/Check"),
        "grpcurl",
    );
    (out.status.success(), text(&out))
}

/// The health port of a daemon started with `*_HEALTH_LISTEN=127.0.0.1:0`
/// answers SERVING in plaintext for the whole server ("", what the manifests'
/// probes ask) and for `service`; the mTLS API port refuses the same probe.
fn assert_probe_serving(daemon: &mut Daemon, api_addr: &str, service: &str) {
    let proto = tempfile::tempdir().unwrap();
    fs::write(proto.path().join("health.proto"), HEALTH_PROTO).unwrap();
    let health_addr = logged_addr(daemon, "plaintext health probe port", "probe_addr=");
    assert_ne!(health_addr, api_addr);
    for name in ["", service] {
        let (ok, out) = plaintext_health_check(proto.path(), &health_addr, name);
        assert!(
            ok && out.contains("\"SERVING\""),
            "plaintext health check of {name:?} on the probe port {health_addr}: {out}"
        );
    }
    let (ok, out) = plaintext_health_check(proto.path(), api_addr, "");
    assert!(
        !ok,
        "the mTLS API port {api_addr} answered a plaintext probe: {out}"
    );
}

fn assert_serving(pki: &DevPki, identity: &str, addr: &str) {
    let (ok, out, err) = grpcurl_call(
        &pki.certs,
        identity,
        addr,
        &["grpc.health.v1.Health/Check"],
        None,
    );
    assert!(
        ok && out.contains("SERVING"),
        "health check as {identity} on {addr}: {out}{err}"
    );
}

/// The vault's wrapping public key for `config`, as deploy/README.md makes it
/// (`vaultd wrapping-key`; the uploader's ConfigMap recvault-uploader-wrapping-key).
fn wrapping_key(config: &Path, env: &[(&str, String)]) -> Vec<u8> {
    let out = run(
        Command::new(binary("vaultd"))
            .args(["wrapping-key", "--config"])
            .arg(config)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str()))),
        "vaultd wrapping-key",
    );
    assert!(out.status.success(), "vaultd wrapping-key:\n{}", text(&out));
    out.stdout
}

/// The line `key = VALUE` of table `[table]` in a TOML text: its index and
/// VALUE as written (a string keeps its quotes; a trailing comment is dropped).
fn toml_line(text: &str, table: &str, key: &str) -> (usize, String) {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            current = header.split(']').next().unwrap().trim().to_owned();
        } else if let Some((k, v)) = line.split_once('=')
            && current == table
            && k.trim() == key
        {
            let v = v.split(" #").next().unwrap().trim();
            return (i, v.to_owned());
        }
    }
    panic!("no {key} in [{table}]:\n{text}")
}

/// The string `key` of `[table]` in a TOML text.
fn toml_string(text: &str, table: &str, key: &str) -> String {
    let (_, raw) = toml_line(text, table, key);
    raw.strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or_else(|| panic!("[{table}] {key} = {raw} is not a basic string"))
        .to_owned()
}

/// `text` with `key` of `[table]` set to `raw` (TOML as written).
fn toml_set(text: &str, table: &str, key: &str, raw: &str) -> String {
    let (at, _) = toml_line(text, table, key);
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            if i == at {
                format!("{key} = {raw}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect()
}

#[test]
fn shipped_kubernetes_configs_start_the_real_binaries() {
    // The shipped configs are for replicas on PostgreSQL.
    let Some(pg) = recvault_tests::postgres::Postgres::shared() else {
        return;
    };
    let pki = dev_pki();
    let cert = |name: &str, ext: &str| fs::read(pki.certs.join(format!("{name}.{ext}"))).unwrap();
    let ca = fs::read(pki.certs.join("ca.crt")).unwrap();
    let k8s = deploy().join("kubernetes/base/config");

    // Kubernetes: the files as the pod sees them (cert-manager names, 0400 key copy).
    let vault_root = Root::new();
    let config = vault_root.put(
        "/etc/recvault/config/vault.toml",
        vault_root
            .rebase(&fs::read_to_string(k8s.join("vault.toml")).unwrap())
            .as_bytes(),
        0o644,
    );
    vault_root.put(
        "/etc/recvault/config/vault-policy.toml",
        &fs::read(k8s.join("vault-policy.toml")).unwrap(),
        0o644,
    );
    vault_root.put("/etc/recvault/tls/tls.crt", &cert("vault", "crt"), 0o644);
    vault_root.put("/etc/recvault/tls/tls.key", &cert("vault", "key"), 0o600);
    vault_root.put("/etc/recvault/tls/ca.crt", &ca, 0o644);
    // What the database-url init container leaves: the URL, owner-only.
    vault_root.put(
        "/run/recvault/database/database.url",
        pg.database().url().as_bytes(),
        0o400,
    );
    let key = vault_root.put(
        "/run/recvault/master-key/master.key",
        &pki.master_key,
        0o440,
    );
    // What a Secret volume gives under fsGroup (0440): vaultd must refuse it,
    // which is why the pod copies the key to a 0400 file first.
    let mut cmd = Command::new(binary("vaultd"));
    cmd.args(["serve", "--config"])
        .arg(&config)
        .env("RECVAULT_VAULT_LISTEN", "127.0.0.1:0")
        .env("RECVAULT_VAULT_METRICS_LISTEN", "127.0.0.1:0");
    let out = run(&mut cmd, "vaultd serve");
    assert!(
        !out.status.success() && text(&out).contains("readable or writable by group or others"),
        "vaultd accepted a 0440 master key:\n{}",
        text(&out)
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
    // The uploader's wrapping key ConfigMap, as deploy/README.md makes it.
    let wrapping_key = wrapping_key(&config, &[]);
    // Every port on loopback, picked by the OS (the config's health_listen is
    // 0.0.0.0:7453), so parallel tests never collide.
    let listen = [
        ("RECVAULT_VAULT_LISTEN", "127.0.0.1:0".to_owned()),
        ("RECVAULT_VAULT_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
        ("RECVAULT_VAULT_HEALTH_LISTEN", "127.0.0.1:0".to_owned()),
    ];
    let (mut vault, vault_addr) = serve("vaultd", &config, &listen, "vault serving");
    assert_serving(&pki, "uploader", &vault_addr);
    // What the pod's readiness and liveness probes ask.
    assert_probe_serving(&mut vault, &vault_addr, "recvault.vault.v1.Leases");

    // The uploader replicas share one PostgreSQL database (jobs, destinations,
    // claims, the audit log) and one S3 bucket (the backups). Here: a database
    // of its own on the test server, and s3s-fs in this process as the bucket,
    // on loopback and path-style where the shipped config names AWS.
    let shipped = fs::read_to_string(k8s.join("uploader.toml")).unwrap();
    let bucket = toml_string(&shipped, "backup_store", "bucket");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let s3_dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(s3_dir.path().join(&bucket)).unwrap();
    let access_key = "AKIARECVAULTBACKUPS1";
    let secret_key = format!("backup-store-secret-{}", std::process::id());
    let s3 = runtime
        .block_on(recvault_tests::s3::serve(
            s3_dir.path(),
            "127.0.0.1:0".parse().unwrap(),
            access_key,
            &secret_key,
            None::<recvault_tests::s3::AuthenticatedOnly>,
        ))
        .unwrap();
    let local = toml_set(
        &toml_set(
            &shipped,
            "backup_store",
            "endpoint",
            &format!("\"{}\"", s3.endpoint),
        ),
        "backup_store",
        "path_style",
        "true",
    );
    let up_root = Root::new();
    let config = up_root.put(
        "/etc/recvault/config/uploader.toml",
        up_root.rebase(&local).as_bytes(),
        0o644,
    );
    up_root.put(
        "/etc/recvault/config/uploader-policy.toml",
        &fs::read(k8s.join("uploader-policy.toml")).unwrap(),
        0o644,
    );
    up_root.put("/etc/recvault/tls/tls.crt", &cert("uploader", "crt"), 0o644);
    up_root.put("/etc/recvault/tls/tls.key", &cert("uploader", "key"), 0o600);
    up_root.put("/etc/recvault/tls/ca.crt", &ca, 0o644);
    up_root.put(
        "/etc/recvault/wrapping-key/backup-wrap.pub",
        &wrapping_key,
        0o444,
    );
    // What the database-url and backup-store-credentials init containers
    // leave: the URL and the bucket's key pair, owner-only.
    let up_db = pg.database();
    let url_file = up_db.url_file(
        up_root
            .file("/run/recvault/database/database.url")
            .parent()
            .unwrap(),
    );
    assert_eq!(
        url_file,
        up_root.file(&toml_string(&shipped, "", "database_url_file"))
    );
    let credentials = serde_json::json!({
        "access_key_id": access_key,
        "secret_access_key": secret_key,
    });
    let credentials_file = toml_string(&shipped, "backup_store", "credentials_file");
    up_root.put(&credentials_file, credentials.to_string().as_bytes(), 0o600);
    let env = [
        ("RECVAULT_UPLOADER_LISTEN", "127.0.0.1:0".to_owned()),
        ("RECVAULT_UPLOADER_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
        ("RECVAULT_UPLOADER_HEALTH_LISTEN", "127.0.0.1:0".to_owned()),
        ("RECVAULT_UPLOADER_VAULT_ENDPOINT", vault_addr.clone()),
    ];
    // The audit key as the Secret volume would give it (0440): refused by
    // name, which is why the pod copies it to a 0400 file first.
    let audit_key = up_root.put("/run/recvault/audit-key/audit.key", &pki.audit_key, 0o440);
    let mut cmd = Command::new(binary("uploaderd"));
    cmd.args(["serve", "--config"])
        .arg(&config)
        .envs(env.clone());
    let out = run(&mut cmd, "uploaderd serve");
    assert!(
        !out.status.success()
            && text(&out).contains("audit_key_file")
            && text(&out).contains("readable or writable by group or others"),
        "uploaderd accepted a 0440 audit key:\n{}",
        text(&out)
    );
    fs::set_permissions(&audit_key, fs::Permissions::from_mode(0o400)).unwrap();
    let (mut uploader, up_addr) = serve("uploaderd", &config, &env, "uploader serving");
    assert_serving(&pki, "recorder", &up_addr);
    assert_probe_serving(&mut uploader, &up_addr, "recvault.uploader.v1.Recordings");
    // Its state went to PostgreSQL, none to the pod (which has no volume for it).
    let tables = pg.psql(
        &up_db,
        "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
    );
    assert_ne!(
        tables, "0",
        "uploaderd created no table in its PostgreSQL database"
    );
    assert!(
        !up_root.path.join("var").exists(),
        "uploaderd wrote under /var, which the pod does not have"
    );
    uploader.stop();
    vault.stop();
    drop(s3);
}

#[test]
fn shipped_example_configs_start_the_real_binaries() {
    let pki = dev_pki();
    let cert = |name: &str, ext: &str| fs::read(pki.certs.join(format!("{name}.{ext}"))).unwrap();
    let ca = fs::read(pki.certs.join("ca.crt")).unwrap();

    // systemd: the example configs the units point at, the key from LoadCredential
    // (a 0400 file in $CREDENTIALS_DIRECTORY, named by the unit's Environment=).
    let examples = deploy().join("config");
    let unit = fs::read_to_string(deploy().join("systemd/recvault-vault.service")).unwrap();
    assert!(unit.contains("Environment=RECVAULT_VAULT_MASTER_KEY_FILE=%d/master.key"));
    let root = Root::new();
    let config = root.put(
        "/etc/recvault/vault.toml",
        root.rebase(&fs::read_to_string(examples.join("vault.example.toml")).unwrap())
            .as_bytes(),
        0o644,
    );
    root.put(
        "/etc/recvault/vault-policy.toml",
        &fs::read(examples.join("vault-policy.example.toml")).unwrap(),
        0o644,
    );
    root.put(
        "/etc/recvault/uploader-policy.toml",
        &fs::read(examples.join("uploader-policy.example.toml")).unwrap(),
        0o644,
    );
    for name in ["vault", "uploader"] {
        root.put(
            &format!("/etc/recvault/tls/{name}.crt"),
            &cert(name, "crt"),
            0o644,
        );
        root.put(
            &format!("/etc/recvault/tls/{name}.key"),
            &cert(name, "key"),
            0o640,
        );
    }
    root.put("/etc/recvault/tls/ca.crt", &ca, 0o644);
    root.dir("/var/lib/recvault/vault");
    root.dir("/var/lib/recvault/uploader");
    let credential = root.put(
        "/run/credentials/recvault-vault.service/master.key",
        &pki.master_key,
        0o400,
    );
    let env = [
        ("RECVAULT_VAULT_LISTEN", "127.0.0.1:0".to_owned()),
        ("RECVAULT_VAULT_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
        (
            "RECVAULT_VAULT_MASTER_KEY_FILE",
            credential.display().to_string(),
        ),
    ];
    root.put(
        "/etc/recvault/uploader/backup-wrap.pub",
        &wrapping_key(&config, &env),
        0o644,
    );
    let (mut vault, vault_addr) = serve("vaultd", &config, &env, "vault serving");
    assert_serving(&pki, "uploader", &vault_addr);
    let config = root.put(
        "/etc/recvault/uploader.toml",
        root.rebase(&fs::read_to_string(examples.join("uploader.example.toml")).unwrap())
            .as_bytes(),
        0o644,
    );
    let unit = fs::read_to_string(deploy().join("systemd/recvault-uploader.service")).unwrap();
    assert!(unit.contains("Environment=RECVAULT_UPLOADER_AUDIT_KEY_FILE=%d/audit.key"));
    let audit_key = root.put(
        "/run/credentials/recvault-uploader.service/audit.key",
        &pki.audit_key,
        0o400,
    );
    let env = [
        ("RECVAULT_UPLOADER_LISTEN", "127.0.0.1:0".to_owned()),
        ("RECVAULT_UPLOADER_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
        ("RECVAULT_UPLOADER_VAULT_ENDPOINT", vault_addr),
        (
            "RECVAULT_UPLOADER_AUDIT_KEY_FILE",
            audit_key.display().to_string(),
        ),
    ];
    let (mut uploader, up_addr) = serve("uploaderd", &config, &env, "uploader serving");
    assert_serving(&pki, "manager", &up_addr);
    uploader.stop();
    vault.stop();
}
