#!/usr/bin/env python3
"""Checks recvault's Kubernetes manifests; CI runs it from tests/tests/deploy_manifests.rs.

  check_manifests.py validate RENDERED.yaml [-k VERSION]...
      Every core resource against the Kubernetes OpenAPI schemas bundled in the
      PyPI package kubernetes-validate (strict: unknown fields are errors);
      cert-manager resources against a structural schema of cert-manager.io/v1
      (kubernetes-validate has no CRD schemas); then recvault's own rules
      (security context, the owner-only files copied from Secrets by init
      containers, both workloads as replicated Deployments on PostgreSQL with a
      PodDisruptionBudget, the uploader's backups in an S3 bucket, identities,
      config paths, kubelet gRPC probes on the plaintext health port, network
      policy). Exit status 1 and one line per problem if anything fails.
  check_manifests.py tree DIR
      Every kustomization.yaml under DIR lists every manifest next to it, every
      file it names exists, every config file is used by a generator, and every
      patch target names a resource (kustomize skips a patch that matches nothing).
  check_manifests.py render DIR
      Prints DIR's kustomization rendered without kustomize (resources,
      namespace, configMapGenerator, images only), for machines with no
      `kubectl kustomize`. Exit status 3 if DIR uses anything else.

Needs Python 3.11+ (tomllib) and kubernetes-validate (which brings PyYAML and
jsonschema), e.g. `pip install --target target/tools/kubernetes-validate
kubernetes-validate` and PYTHONPATH pointing there.
"""

import argparse
import os
import posixpath
import re
import sys
import tomllib

import jsonschema
import yaml

TRUST_DOMAIN = "recvault.local"
# Workload component label -> expected identity and the binary it runs.
# `metrics_default`: the metrics port when the config sets none (on loopback).
# `services`: the names whose health status the binary sets ("" is the whole server).
WORKLOADS = {
    "vault": {
        "binary": "vaultd",
        "metrics_default": 9443,
        "identity": f"spiffe://{TRUST_DOMAIN}/vault",
        "services": ["", "recvault.vault.v1.Credentials", "recvault.vault.v1.Leases",
                     "recvault.vault.v1.Keys", "recvault.vault.v1.Audit"],
    },
    "uploader": {
        "binary": "uploaderd",
        "metrics_default": 9444,
        "identity": f"spiffe://{TRUST_DOMAIN}/uploader",
        "services": ["", "recvault.uploader.v1.Recordings", "recvault.uploader.v1.Destinations",
                     "recvault.uploader.v1.Jobs", "recvault.uploader.v1.Audit"],
    },
}
ISSUER_NAME = "recvault-ca"
CERT_MANAGER_KINDS = {"Certificate", "Issuer", "ClusterIssuer"}
CLUSTER_SCOPED = {"Namespace", "ClusterIssuer", "ClusterRole", "ClusterRoleBinding"}
# Files cert-manager writes into a Certificate's Secret.
CERT_MANAGER_FILES = {"tls.crt", "tls.key", "ca.crt"}

# --------------------------------------------------------------------------
# cert-manager.io/v1 structural schemas (the fields we use and their types,
# from cert-manager's CRDs; unknown fields are errors, as with --strict).

_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
_ISSUER_REF = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "group": {"const": "cert-manager.io"},
    },
}
_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment",
    "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
    "decipher only", "any", "server auth", "client auth", "code signing",
    "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
    "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
]
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
CERTIFICATE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretName", "issuerRef"],
            "anyOf": [
                {"required": ["commonName"]}, {"required": ["dnsNames"]},
                {"required": ["uris"]}, {"required": ["ipAddresses"]},
                {"required": ["emailAddresses"]},
            ],
            "properties": {
                "secretName": {"type": "string", "minLength": 1},
                "issuerRef": _ISSUER_REF,
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": {"type": "array", "items": {"type": "string"}},
                "uris": {"type": "array", "items": {"type": "string", "pattern": r"^[a-z][a-z0-9+.-]*://"}},
                "ipAddresses": {"type": "array", "items": {"type": "string"}},
                "emailAddresses": {"type": "array", "items": {"type": "string"}},
                "duration": _DURATION,
                "renewBefore": _DURATION,
                "isCA": {"type": "boolean"},
                "usages": {"type": "array", "items": {"enum": _USAGES}},
                "revisionHistoryLimit": {"type": "integer", "minimum": 1},
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "size": {"type": "integer"},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    },
                },
                "subject": {"type": "object"},
                "secretTemplate": {"type": "object"},
            },
        },
    },
}
ISSUER_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {
                "selfSigned": {"type": "object"},
                "ca": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["secretName"],
                    "properties": {
                        "secretName": {"type": "string", "minLength": 1},
                        "crlDistributionPoints": {"type": "array", "items": {"type": "string"}},
                        "ocspServers": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "acme": {"type": "object"},
                "vault": {"type": "object"},
                "venafi": {"type": "object"},
            },
        },
    },
}


class Problems:
    def __init__(self):
        self.items = []

    def add(self, where, message):
        self.items.append(f"{where}: {message}")

    def check(self, ok, where, message):
        if not ok:
            self.add(where, message)
        return ok


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# --------------------------------------------------------------------------
# Schema validation


def validate_schemas(docs, versions, problems):
    import kubernetes_validate.utils as kv

    for doc in docs:
        where = name_of(doc)
        if doc.get("apiVersion", "").startswith("cert-manager.io/"):
            schema = CERTIFICATE_SCHEMA if doc.get("kind") == "Certificate" else ISSUER_SCHEMA
            if doc.get("kind") not in CERT_MANAGER_KINDS:
                problems.add(where, "unexpected cert-manager kind")
                continue
            for error in jsonschema.Draft7Validator(schema).iter_errors(doc):
                path = ".".join(str(p) for p in error.absolute_path)
                problems.add(where, f"cert-manager.io/v1 schema: {path}: {error.message}")
            continue
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.add(where, f"Kubernetes {version} schema (strict): {path}: {e.message}")
            except kv.SchemaNotFoundError as e:
                problems.add(where, f"no schema ({e.message}); only cert-manager kinds may lack one")


# --------------------------------------------------------------------------
# recvault rules


def selector_matches(match_labels, labels):
    return all(labels.get(k) == v for k, v in (match_labels or {}).items())


def pod_selector_labels(selector, where, problems):
    """matchLabels of a label selector; matchExpressions are not understood here."""
    if selector is None:
        return {}
    if selector.get("matchExpressions"):
        problems.add(where, "matchExpressions in a selector: not supported by this check")
    return selector.get("matchLabels") or {}


def under(path, directory):
    path, directory = posixpath.normpath(path), posixpath.normpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def mount_for(container, path):
    """The most specific volumeMount of `container` containing `path`."""
    best = None
    for m in container.get("volumeMounts") or []:
        if under(path, m["mountPath"]) and (best is None or len(m["mountPath"]) > len(best["mountPath"])):
            best = m
    return best


def check_security_context(pod, container, where, problems, may_add):
    psc = pod.get("securityContext") or {}
    sc = container.get("securityContext") or {}
    problems.check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where, "runAsNonRoot must be true")
    problems.check(sc.get("runAsUser", psc.get("runAsUser")) != 0, where, "runAsUser must not be 0")
    problems.check(sc.get("readOnlyRootFilesystem") is True, where, "readOnlyRootFilesystem must be true")
    problems.check(sc.get("allowPrivilegeEscalation") is False, where, "allowPrivilegeEscalation must be false")
    problems.check(sc.get("privileged") is not True, where, "privileged must not be true")
    caps = sc.get("capabilities") or {}
    problems.check("ALL" in (caps.get("drop") or []), where, "capabilities.drop must contain ALL")
    added = set(caps.get("add") or [])
    problems.check(added <= may_add, where, f"capabilities.add {sorted(added)} allows more than {sorted(may_add) or 'nothing'}")
    seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    problems.check(seccomp in ("RuntimeDefault", "Localhost"), where, "seccompProfile must be RuntimeDefault (or Localhost)")
    res = container.get("resources") or {}
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    for r in ("cpu", "memory"):
        problems.check(r in req and r in lim, where, f"resources.requests and limits must set {r}")
    problems.check(req == lim, where, "resources.requests must equal limits (Guaranteed QoS: never swapped)")


def parse_toml(configmaps, volume, key, where, problems):
    cm = configmaps.get((volume.get("configMap") or {}).get("name"))
    if not problems.check(cm is not None, where, f"ConfigMap {(volume.get('configMap') or {}).get('name')} is not in the manifests"):
        return None
    text = (cm.get("data") or {}).get(key)
    if not problems.check(text is not None, where, f"ConfigMap {cm['metadata']['name']} has no key {key}"):
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        problems.add(where, f"{key} is not valid TOML: {e}")
        return None


def check_workload(doc, ctx, problems):
    meta = doc["metadata"]
    where = name_of(doc)
    template = doc["spec"]["template"]
    pod = template["spec"]
    labels = template["metadata"].get("labels") or {}
    component = labels.get("app.kubernetes.io/component")
    if not problems.check(component in WORKLOADS, where, f"pod label app.kubernetes.io/component must be one of {sorted(WORKLOADS)}"):
        return
    spec = WORKLOADS[component]
    if not problems.check(component not in ctx["workloads"], where, f"a second {component} workload"):
        return
    info = ctx["workloads"][component] = {"doc": doc, "labels": labels}

    problems.check(pod.get("automountServiceAccountToken") is False, where, "automountServiceAccountToken must be false")
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        problems.check(pod.get(host) is not True, where, f"{host} must not be true")
    problems.check((pod.get("securityContext") or {}).get("runAsNonRoot") is True, where, "pod securityContext.runAsNonRoot must be true")
    ipc_lock = {"IPC_LOCK"}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    claims = {c["metadata"]["name"] for c in doc["spec"].get("volumeClaimTemplates") or []}
    claims |= {n for n, v in volumes.items() if "persistentVolumeClaim" in v}

    for c in pod.get("initContainers") or []:
        check_security_context(pod, c, f"{where} initContainer {c['name']}", problems, set())
    containers = pod.get("containers") or []
    if not problems.check(len(containers) == 1, where, "expected exactly one container"):
        return
    c = containers[0]
    cw = f"{where} container {c['name']}"
    check_security_context(pod, c, cw, problems, ipc_lock)
    info["ipc_lock"] = "IPC_LOCK" in ((c.get("securityContext") or {}).get("capabilities") or {}).get("add", [])

    command = (c.get("command") or []) + (c.get("args") or [])
    problems.check(any(posixpath.basename(a) == spec["binary"] for a in command[:1]) or c.get("command") is None,
                   cw, f"command must run {spec['binary']}")
    args = c.get("args") or []
    if not problems.check(len(args) >= 3 and args[:2] == ["serve", "--config"], cw, "args must be: serve --config FILE"):
        return
    config_path = args[2]
    m = mount_for(c, config_path)
    if not problems.check(m is not None and "configMap" in volumes.get(m["name"], {}), cw, f"{config_path} is not on a ConfigMap mount"):
        return
    config = parse_toml(ctx["configmaps"], volumes[m["name"]], posixpath.relpath(config_path, m["mountPath"]), cw, problems)
    if config is None:
        return
    info["config"] = config

    tmp = mount_for(c, "/tmp")
    problems.check(tmp is not None and tmp["mountPath"] == "/tmp" and "emptyDir" in volumes.get(tmp["name"], {}), cw, "/tmp must be an emptyDir")

    # The ports: API (listen, containerPort, Service), metrics, and the plaintext
    # health port the kubelet's gRPC probes use.
    listen = str(config.get("listen", ""))
    host, _, port = listen.rpartition(":")
    problems.check(host in ("0.0.0.0", "[::]"), cw, f"listen = {listen!r} must accept connections from the Service (0.0.0.0 or [::])")
    port = int(port) if port.isdigit() else None
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
    info["ports_spec"] = c.get("ports") or []
    if "metrics_listen" in config:
        mhost, _, mport = str(config["metrics_listen"]).rpartition(":")
        if mhost not in ("127.0.0.1", "[::1]"):
            problems.check(mport.isdigit() and int(mport) in ports.values(), cw,
                           f"metrics_listen {config['metrics_listen']} is not loopback, so it must be a containerPort")
    problems.check(port in ports.values(), cw, f"the listen port {port} is not a containerPort")
    info["port"] = port
    mport = str(config.get("metrics_listen", f":{spec['metrics_default']}")).rpartition(":")[2]
    info["metrics_port"] = int(mport) if mport.isdigit() else None
    health_port = check_health_port(config, ports, port, info["metrics_port"], cw, problems)
    info["health_port"] = health_port
    for probe in ("readinessProbe", "livenessProbe"):
        check_probe(c.get(probe), probe, port, health_port, spec["services"], cw, problems)
    services = [s for s in ctx["services"] if selector_matches(s["spec"].get("selector"), labels) and s["spec"].get("selector")]
    if problems.check(len(services) >= 1, cw, "no Service selects this workload"):
        svc = services[0]
        info["service"] = svc
        for sp in svc["spec"]["ports"]:
            tp = sp.get("targetPort", sp["port"])
            problems.check(ports.get(tp, tp) == port, f"Service/{svc['metadata']['name']}", f"targetPort {tp} is not the API port {port}")

    # TLS files come from the cert-manager Secret of this workload's Certificate.
    tls_secrets = set()
    for section in [config.get("tls")] + ([config["vault"].get("tls")] if isinstance(config.get("vault"), dict) else []):
        if not problems.check(isinstance(section, dict), cw, "config has no [tls] section"):
            continue
        for field in ("cert", "key", "ca"):
            path = section.get(field, "")
            tm = mount_for(c, path)
            vol = volumes.get(tm["name"], {}) if tm else {}
            if problems.check("secret" in vol, cw, f"TLS file {path} is not on a Secret mount"):
                tls_secrets.add(vol["secret"]["secretName"])
                problems.check(posixpath.relpath(path, tm["mountPath"]) in CERT_MANAGER_FILES, cw,
                               f"TLS file {path} is not one cert-manager writes ({sorted(CERT_MANAGER_FILES)})")
                problems.check("subPath" not in tm, cw, "TLS mounts must not use subPath (renewals would never arrive)")
    problems.check(len(tls_secrets) == 1, cw, f"all TLS files must come from one Secret, got {sorted(tls_secrets)}")
    info["tls_secret"] = next(iter(tls_secrets), None)

    # State on the persistent volume, writable. With database_url_file the audit
    # log lives in PostgreSQL (the uploader's rules below forbid the local
    # files a replica would lose with its pod).
    replicated = "database_url_file" in config
    for field in ("database", "audit_database", "backup_dir"):
        if field in config and not (replicated and field in ("audit_database", "backup_dir")):
            sm = mount_for(c, config[field])
            problems.check(sm is not None and sm["name"] in claims and not sm.get("readOnly"), cw,
                           f"{field} = {config[field]} must be on a writable PersistentVolumeClaim mount")

    info["secrets"] = {v["secret"]["secretName"] for v in volumes.values() if "secret" in v}
    check_replicated(doc, component, pod, claims, labels, info, problems)
    if component == "vault":
        check_vault_replicas(config, pod, c, volumes, cw, problems)
    if component == "uploader":
        check_uploader_replicas(config, pod, c, volumes, cw, problems)

    if component == "uploader":
        check_key_file(pod, c, volumes, config, cw, problems, "audit_key_file", "audit key", "audit-key", "uploaderd")
    if component == "vault":
        check_key_file(pod, c, volumes, config, cw, problems, "master_key_file", "master key", "master-key", "vaultd")
        policy = config.get("policy_file", "")
        pm = mount_for(c, policy)
        if problems.check(pm is not None and "configMap" in volumes.get(pm["name"], {}), cw, f"policy_file {policy} is not on a ConfigMap mount"):
            grants = parse_toml(ctx["configmaps"], volumes[pm["name"]], posixpath.relpath(policy, pm["mountPath"]), cw, problems)
            ctx["policy"] = grants


def check_health_port(config, ports, api_port, metrics_port, cw, problems):
    """health_listen: the plaintext grpc.health.v1-only port the kubelet probes.
    The kubelet dials the pod IP, so it must not be loopback, and it must be a
    declared containerPort of its own. Returns the port, or None."""
    health = config.get("health_listen")
    if not problems.check(health is not None, cw,
                          "health_listen must be set: the kubelet's gRPC probes cannot pass the mTLS-only API port"):
        return None
    hhost, _, hport = str(health).rpartition(":")
    problems.check(hhost in ("0.0.0.0", "[::]"), cw,
                   f"health_listen = {health!r} must accept the kubelet, which probes the pod IP (0.0.0.0 or [::])")
    if not problems.check(hport.isdigit() and int(hport) not in (0, api_port, metrics_port), cw,
                          f"health_listen = {health!r} needs a fixed port of its own (not the API port {api_port} or metrics port {metrics_port})"):
        return None
    hport = int(hport)
    problems.check(hport in ports.values(), cw, f"the health_listen port {hport} is not a containerPort")
    return hport


def check_probe(p, probe, api_port, health_port, services, cw, problems):
    """A native kubelet gRPC probe on the health port, for the whole server or
    one service the binary reports. Never on the API port: the kubelet's gRPC
    probe is plaintext without a client certificate, which the API port refuses."""
    if not problems.check(p is not None, cw, f"{probe} is missing"):
        return
    grpc = p.get("grpc")
    if grpc is not None and grpc.get("port") == api_port:
        problems.add(cw, f"{probe}: the kubelet's gRPC probe is plaintext and cannot pass the mTLS-only port {api_port}")
        return
    if not problems.check(grpc is not None, cw,
                          f"{probe} must be a kubelet gRPC probe (grpc: {{port: {health_port}}}) on the health port, "
                          f"got {sorted(set(p) & {'tcpSocket', 'httpGet', 'exec'}) or 'none'}"):
        return
    if health_port is not None:
        problems.check(grpc.get("port") == health_port, cw,
                       f"{probe}: grpc.port {grpc.get('port')} is not the health_listen port {health_port}")
    service = grpc.get("service", "")
    problems.check(service in services, cw,
                   f"{probe}: grpc.service {service!r} is not a service the binary reports (one of {services}); "
                   "an unknown one answers NOT_FOUND and the probe never passes")


def check_key_file(pod, c, volumes, config, cw, problems, field, what, suffix, binary, path=None):
    """A secret file (the vault's master key, the uploader's audit key, a
    database URL, the backup bucket's credentials): from a Secret (mode 0400)
    via an init container into a memory-backed emptyDir as an owner-only file,
    mounted read-only into the service. Both binaries refuse group/world-readable
    secret files, and the kubelet makes Secret files 0440 whenever fsGroup is
    set, so the service must not read the Secret volume itself. `path` is the
    file when it is not `config[field]` (a field of a table)."""
    if path is None:
        path = config.get(field, "")
    km = mount_for(c, path)
    if not problems.check(km is not None, cw, f"{field} {path} is not on any mount"):
        return
    vol = volumes.get(km["name"], {})
    problems.check(km.get("readOnly") is True, cw, f"the {what} mount must be readOnly")
    problems.check((vol.get("emptyDir") or {}).get("medium") == "Memory", cw,
                   f"the {what} must be on a memory-backed emptyDir (never on disk)")
    secret_volumes = [v for v in volumes.values() if "secret" in v and v["secret"]["secretName"].endswith(suffix)]
    if not problems.check(len(secret_volumes) == 1, cw, f"expected one Secret volume holding the {what} (name ending in {suffix})"):
        return
    sv = secret_volumes[0]
    s = sv["secret"]
    problems.check(s.get("defaultMode") == 0o400, cw, f"{what} Secret defaultMode must be 0400, got {oct(s.get('defaultMode') or 0)}")
    for item in s.get("items") or []:
        problems.check(item.get("mode", 0o400) == 0o400, cw, f"{what} Secret item {item.get('key')} mode must be 0400")
    problems.check(all(m["name"] != sv["name"] for m in c.get("volumeMounts") or []), cw,
                   f"{binary} must not mount the {what} Secret itself (the kubelet makes it 0440 under fsGroup)")
    copiers = [ic for ic in pod.get("initContainers") or []
               if {m["name"] for m in ic.get("volumeMounts") or []} >= {sv["name"], km["name"]}]
    if problems.check(len(copiers) == 1, cw, f"an initContainer must copy the {what} from the Secret into the emptyDir"):
        script = " ".join((copiers[0].get("command") or []) + (copiers[0].get("args") or []))
        key_file = posixpath.basename(path)
        problems.check("chmod 0400" in script or "chmod 400" in script or "install -m 0400" in script, cw,
                       f"the init container must make the {what} copy mode 0400")
        problems.check(key_file in script, cw, f"the init container must write {key_file}")


# Where each replicated workload keeps its state (for the messages).
STATE = {"vault": "PostgreSQL", "uploader": "PostgreSQL and the backup bucket"}


def check_replicated(doc, component, pod, claims, labels, info, problems):
    """Both workloads run as several replicas that keep their state outside the
    pod: a Deployment of at least 2 with no PersistentVolumeClaim, a rollout
    that starts a new pod before it stops an old one, the replicas spread over
    nodes. (The PodDisruptionBudget: check_disruption_budgets.)"""
    where = name_of(doc)
    replicas = doc["spec"].get("replicas", 1)
    info["replicas"] = replicas
    problems.check(doc["kind"] == "Deployment", where, f"the {component} must be a Deployment (its state lives in {STATE[component]})")
    problems.check(isinstance(replicas, int) and replicas >= 2, where, f"the {component} needs at least 2 replicas, got {replicas}")
    claims = claims | {c["metadata"]["name"] for c in doc["spec"].get("volumeClaimTemplates") or []}
    problems.check(not claims, where,
                   f"the {component} must keep no state in its pods (it lives in {STATE[component]}): "
                   f"no PersistentVolumeClaim (volumeClaimTemplates or persistentVolumeClaim volumes), got {sorted(claims)}")
    if doc["kind"] == "Deployment":
        strategy = doc["spec"].get("strategy") or {}
        unavailable = (strategy.get("rollingUpdate") or {}).get("maxUnavailable")
        problems.check(strategy.get("type", "RollingUpdate") == "RollingUpdate" and unavailable in (0, "0%"), where,
                       f"a rollout must start a new {component} pod before it stops an old one "
                       f"(strategy RollingUpdate with maxUnavailable: 0), got {strategy or 'the default'}")
    spread = [t for t in pod.get("topologySpreadConstraints") or [] if t.get("topologyKey") == "kubernetes.io/hostname"
              and (t.get("labelSelector") or {}).get("matchLabels")
              and selector_matches((t.get("labelSelector") or {}).get("matchLabels"), labels)]
    problems.check(spread, where, f"the {component} replicas must spread over nodes (topologySpreadConstraints on kubernetes.io/hostname)")


def check_vault_replicas(config, pod, c, volumes, cw, problems):
    """The vault's replicas on one PostgreSQL database: no SQLite file (two pods
    on one file, or each on its own, would be two vaults), the database URL (it
    holds a password) delivered like the master key."""
    problems.check("database_url_file" in config and "database" not in config, cw,
                   "several vault replicas need database_url_file (PostgreSQL), not database (a SQLite file)")
    if "database_url_file" in config:
        check_key_file(pod, c, volumes, config, cw, problems, "database_url_file", "database URL", "-database", "vaultd")


BACKUP_STORE_KEYS = ("endpoint", "region", "bucket", "prefix", "credentials_file")


def check_uploader_replicas(config, pod, c, volumes, cw, problems):
    """The uploader's replicas share everything through PostgreSQL (jobs,
    destinations, claims, the audit log) and an S3 bucket (the backups): no
    SQLite file, no local audit log, no local backup directory (a replica's
    files would be lost with its pod and unseen by the others). The database
    URL and the bucket's credentials are delivered like the audit key."""
    problems.check("database_url_file" in config and "database" not in config, cw,
                   "several uploader replicas need database_url_file (PostgreSQL), not database (a SQLite file)")
    if "database_url_file" in config:
        check_key_file(pod, c, volumes, config, cw, problems, "database_url_file", "database URL", "-database", "uploaderd")
    problems.check("audit_database" not in config, cw,
                   f"audit_database = {config.get('audit_database')}: the uploader replicas' audit log lives in "
                   "PostgreSQL (database_url_file: one chain for every replica); a local file would be lost with its pod")
    problems.check("backup_dir" not in config, cw,
                   f"backup_dir = {config.get('backup_dir')}: the replicas keep their backups in the [backup_store] "
                   "bucket; a local directory would be lost with its pod and unseen by the other replicas")
    store = config.get("backup_store")
    if not problems.check(isinstance(store, dict), cw, "config has no [backup_store] table: the replicas' backups must go to an S3 bucket"):
        return
    for key in BACKUP_STORE_KEYS:
        problems.check(isinstance(store.get(key), str) and store[key], cw, f"[backup_store] {key} must be set")
    problems.check(isinstance(store.get("path_style", False), bool), cw, "[backup_store] path_style must be true or false")
    endpoint = str(store.get("endpoint", ""))
    problems.check(endpoint.startswith("https://"), cw,
                   f"[backup_store] endpoint {endpoint!r} must be https:// (the bucket's credentials and the backups cross the network)")
    if isinstance(store.get("credentials_file"), str):
        check_key_file(pod, c, volumes, config, cw, problems, "credentials_file", "backup store credentials", "-backup-store",
                       "uploaderd", path=store["credentials_file"])


def check_disruption_budgets(ctx, problems):
    """One PodDisruptionBudget per workload, selecting exactly its pods, that
    keeps one serving and still lets a drain proceed."""
    for component, info in ctx["workloads"].items():
        where = name_of(info["doc"])
        replicas = info.get("replicas", 1)
        selecting = []
        for d in ctx["pdbs"]:
            sel = pod_selector_labels((d.get("spec") or {}).get("selector"), name_of(d), problems)
            if sel and selector_matches(sel, info["labels"]):
                selecting.append((d, sel))
        if not problems.check(len(selecting) == 1, where, f"expected one PodDisruptionBudget selecting the {component}, got {len(selecting)}"):
            continue
        pdb, sel = selecting[0]
        others = sorted(o for o, oi in ctx["workloads"].items() if o != component and selector_matches(sel, oi["labels"]))
        problems.check(not others, name_of(pdb), f"must select exactly the {component} pods, it also selects the {', '.join(others)} pods")
        spec = pdb["spec"]
        if not isinstance(replicas, int):
            continue
        keeps = (isinstance(spec.get("minAvailable"), int) and 1 <= spec["minAvailable"] < replicas) or \
                (isinstance(spec.get("maxUnavailable"), int) and 1 <= spec["maxUnavailable"] < replicas)
        problems.check(keeps, name_of(pdb),
                       f"must keep at least one {component} serving and let a drain proceed (minAvailable or maxUnavailable between 1 and {replicas - 1})")


def check_separate_secrets(ctx, problems):
    """The vault and the uploader share no Secret: each has its own
    certificate, database and keys (the uploader must never hold the master key
    or the vault's database password)."""
    vault, up = ctx["workloads"].get("vault"), ctx["workloads"].get("uploader")
    if vault and up:
        for name in sorted(vault.get("secrets", set()) & up.get("secrets", set())):
            problems.add(f"Secret {name}", "is mounted by both the vault and the uploader: each needs credentials of its own")


def check_certificates(ctx, problems):
    certs = {d["spec"]["secretName"]: d for d in ctx["certificates"] if isinstance(d.get("spec"), dict) and "secretName" in d["spec"]}
    ns = ctx["namespace"]
    issuers = {d["metadata"]["name"] for d in ctx["issuers"]}
    for component, info in ctx["workloads"].items():
        where = f"{component} identity"
        cert = certs.get(info.get("tls_secret"))
        if not problems.check(cert is not None, where, f"no Certificate writes Secret {info.get('tls_secret')}"):
            continue
        cwhere = name_of(cert)
        spec = cert["spec"]
        info["certificate"] = cert
        problems.check(spec.get("uris") == [WORKLOADS[component]["identity"]], cwhere,
                       f"uris must be exactly [{WORKLOADS[component]['identity']}], got {spec.get('uris')}")
        ref = spec.get("issuerRef") or {}
        problems.check(ref.get("name") == ISSUER_NAME, cwhere, f"issuerRef.name must be {ISSUER_NAME}")
        if issuers:
            problems.check(ref.get("name") in issuers, cwhere, f"issuer {ref.get('name')} is not in the manifests")
        usages = set(spec.get("usages") or [])
        need = {"server auth"} | ({"client auth"} if component == "uploader" else set())
        problems.check(need <= usages, cwhere, f"usages must include {sorted(need)}")
        problems.check(not spec.get("isCA"), cwhere, "a workload certificate must not be a CA")
        svc = info.get("service")
        if svc:
            name = svc["metadata"]["name"]
            for dns in (name, f"{name}.{ns}.svc"):
                problems.check(dns in (spec.get("dnsNames") or []), cwhere, f"dnsNames must include {dns} (Service {name} in namespace {ns})")


def check_uploader_to_vault(ctx, problems):
    up, vault = ctx["workloads"].get("uploader"), ctx["workloads"].get("vault")
    if not (up and vault and up.get("config") and vault.get("service") and vault.get("certificate")):
        problems.add("uploader", "cannot check the uploader's vault settings (missing workload, config, Service or Certificate)")
        return
    where = "uploader config [vault]"
    section = up["config"].get("vault") or {}
    endpoint = section.get("endpoint", "")
    host, _, port = endpoint.rpartition(":")
    svc = vault["service"]
    name, ns = svc["metadata"]["name"], ctx["namespace"]
    names = {name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"}
    problems.check(host in names, where, f"endpoint host {host!r} is not the vault Service ({sorted(names)})")
    problems.check(port.isdigit() and int(port) in [p["port"] for p in svc["spec"]["ports"]], where,
                   f"endpoint port {port} is not a port of Service {name}")
    problems.check(section.get("server_name") in (vault["certificate"]["spec"].get("dnsNames") or []), where,
                   f"server_name {section.get('server_name')!r} is not a dnsName of the vault's Certificate")
    identities = [i for role in (up["config"].get("access") or {}).values() for i in role]
    for i in identities:
        problems.check(i.startswith(f"spiffe://{TRUST_DOMAIN}/"), "uploader config [access]", f"{i} is not a {TRUST_DOMAIN} identity")
    policy = ctx.get("policy")
    if policy is not None:
        grants = policy.get("grant") or []
        uploader_id = WORKLOADS["uploader"]["identity"]
        problems.check(any(g.get("identity") == uploader_id and "uploader" in (g.get("roles") or []) for g in grants),
                       "vault policy", f"{uploader_id} must hold the uploader role")
        for g in grants:
            problems.check(str(g.get("identity", "")).startswith(f"spiffe://{TRUST_DOMAIN}/"), "vault policy",
                           f"grant identity {g.get('identity')} is not a {TRUST_DOMAIN} identity")
            if "uploader" in (g.get("roles") or []):
                problems.check(g.get("identity") == uploader_id, "vault policy", f"only {uploader_id} may hold the uploader role (plaintext leases)")


def rule_covers_port(ports, port, names):
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        start = p.get("port")
        if start is None or start in names:
            return True
        if isinstance(start, int) and start <= port <= p.get("endPort", start):
            return True
    return False


def policies_selecting(ctx, labels, kind, problems):
    out = []
    for np in ctx["netpols"]:
        sel = pod_selector_labels(np["spec"].get("podSelector"), name_of(np), problems)
        types = np["spec"].get("policyTypes") or (["Ingress", "Egress"] if "egress" in np["spec"] else ["Ingress"])
        if selector_matches(sel, labels) and kind in types:
            out.append(np)
    return out


def check_network_policies(ctx, problems):
    vault, up = ctx["workloads"].get("vault"), ctx["workloads"].get("uploader")
    if not (vault and up and vault.get("port")):
        problems.add("NetworkPolicy", "cannot check without both workloads")
        return
    where = "NetworkPolicy (vault)"
    ingress_pols = policies_selecting(ctx, vault["labels"], "Ingress", problems)
    if not problems.check(ingress_pols, where, "no NetworkPolicy restricts ingress to the vault"):
        return
    uploader_allowed = False
    api_names = {p.get("name") for p in vault.get("ports_spec") or [] if p["containerPort"] == vault["port"]} - {None}
    for np in ingress_pols:
        for rule in np["spec"].get("ingress") or []:
            rw = f"{name_of(np)} ingress rule"
            # Only rules that open the API port matter: a rule without ports opens all of them.
            if not rule_covers_port(rule.get("ports"), vault["port"], api_names):
                continue
            peers = rule.get("from") or []
            problems.check(peers, rw, f"an ingress rule without `from` admits every source to the API port {vault['port']}")
            for peer in peers:
                ok = (set(peer) == {"podSelector"}
                      and "app.kubernetes.io/name" in (pod_selector_labels(peer["podSelector"], rw, problems))
                      and selector_matches(peer["podSelector"].get("matchLabels"), up["labels"])
                      and not selector_matches(peer["podSelector"].get("matchLabels"), vault["labels"]))
                problems.check(ok, rw, f"vault ingress peer {peer} is not exactly the uploader pods in this namespace")
                uploader_allowed |= ok
    problems.check(uploader_allowed, where, "no rule lets the uploader reach the vault")
    egress_pols = policies_selecting(ctx, vault["labels"], "Egress", problems)
    problems.check(egress_pols, where, "vault egress is not restricted")
    allowed = {("UDP", 53), ("TCP", 53), ("TCP", 5432)}
    for np in egress_pols:
        for rule in np["spec"].get("egress") or []:
            ports = {(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports") or []}
            ranged = any("endPort" in p for p in rule.get("ports") or [])
            problems.check(ports and ports <= allowed and not ranged, name_of(np),
                           "the vault may reach only DNS (53) and PostgreSQL (TCP 5432): "
                           f"egress rule with ports {sorted(ports, key=str) or 'all'}")
    # The uploader: DNS, the vault, PostgreSQL, HTTPS (the backup bucket and
    # destinations), nothing else; the vault's port only to the vault pods.
    upw = "NetworkPolicy (uploader)"
    up_egress = policies_selecting(ctx, up["labels"], "Egress", problems)
    problems.check(up_egress, upw, "uploader egress is not restricted")
    up_allowed = {("UDP", 53), ("TCP", 53), ("TCP", vault["port"]), ("TCP", 5432), ("TCP", 443)}
    opened = set()
    for np in up_egress:
        for rule in np["spec"].get("egress") or []:
            ports = {(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports") or []}
            ranged = any("endPort" in p for p in rule.get("ports") or [])
            problems.check(ports and ports <= up_allowed and not ranged, name_of(np),
                           f"the uploader may reach only DNS (53), the vault (TCP {vault['port']}), PostgreSQL (TCP 5432) "
                           f"and HTTPS (TCP 443): egress rule with ports {sorted(ports, key=str) or 'all'}")
            opened |= ports
            if ("TCP", vault["port"]) in ports:
                peers = rule.get("to") or []
                only_vault = peers and all(
                    set(peer) == {"podSelector"} and pod_selector_labels(peer["podSelector"], name_of(np), problems)
                    and selector_matches(peer["podSelector"].get("matchLabels"), vault["labels"]) for peer in peers)
                problems.check(only_vault, name_of(np),
                               f"uploader egress to port {vault['port']} must go to the vault pods only (a podSelector in this namespace)")
    for need, what in ((("TCP", 5432), "its PostgreSQL database (TCP 5432)"),
                       (("TCP", 443), "the backup bucket and the destinations (TCP 443)")):
        problems.check(not up_egress or need in opened, upw, f"uploader egress must allow {what}")
    if up_egress:
        reach = any(
            any("podSelector" in peer and selector_matches(peer["podSelector"].get("matchLabels"), vault["labels"])
                and "namespaceSelector" not in peer for peer in rule.get("to") or [])
            and any(p.get("port") == vault["port"] for p in rule.get("ports") or [])
            for np in up_egress for rule in np["spec"].get("egress") or [])
        problems.check(reach, upw, f"uploader egress must allow the vault on port {vault['port']}")
    problems.check(any(np["spec"].get("podSelector") in ({}, None) and "Ingress" in (np["spec"].get("policyTypes") or [])
                       and not np["spec"].get("ingress") for np in ctx["netpols"]),
                   "NetworkPolicy", "no default-deny ingress policy for the namespace")


def check_namespace(ctx, problems):
    ns_docs = ctx["namespaces"]
    if not problems.check(len(ns_docs) == 1, "Namespace", f"expected one Namespace, got {len(ns_docs)}"):
        return
    ns = ns_docs[0]
    labels = ns["metadata"].get("labels") or {}
    level = labels.get("pod-security.kubernetes.io/enforce")
    ipc_lock = any(w.get("ipc_lock") for w in ctx["workloads"].values())
    if ipc_lock:
        # Baseline and restricted both reject capabilities.add: [IPC_LOCK].
        problems.check(level == "privileged", name_of(ns),
                       "pods add IPC_LOCK, which Pod Security baseline and restricted reject: enforce must be privileged")
        problems.check(labels.get("pod-security.kubernetes.io/warn") == "restricted", name_of(ns), "warn must stay restricted")
    else:
        problems.check(level == "restricted", name_of(ns), f"pod-security.kubernetes.io/enforce must be restricted, got {level}")


def check_recvault(docs, problems):
    namespaces = [d for d in docs if d.get("kind") == "Namespace"]
    ctx = {
        "namespaces": namespaces,
        "namespace": namespaces[0]["metadata"]["name"] if namespaces else None,
        "configmaps": {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"},
        "services": [d for d in docs if d.get("kind") == "Service"],
        "netpols": [d for d in docs if d.get("kind") == "NetworkPolicy"],
        "pdbs": [d for d in docs if d.get("kind") == "PodDisruptionBudget"],
        "certificates": [d for d in docs if d.get("kind") == "Certificate" and d.get("apiVersion", "").startswith("cert-manager.io/")],
        "issuers": [d for d in docs if d.get("kind") in ("Issuer", "ClusterIssuer")],
        "workloads": {},
    }
    for d in docs:
        if d.get("kind") == "Secret":
            problems.add(name_of(d), "Secrets must not be in the manifests (the master key, the audit key, the database URLs "
                                     "and the backup bucket's credentials are created by hand)")
        if ctx["namespace"] and d.get("kind") not in CLUSTER_SCOPED:
            problems.check(d.get("metadata", {}).get("namespace") == ctx["namespace"], name_of(d),
                           f"must be in namespace {ctx['namespace']}")
    for d in docs:
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet"):
            check_workload(d, ctx, problems)
    for component in WORKLOADS:
        problems.check(component in ctx["workloads"], "manifests", f"no {component} workload")
    check_disruption_budgets(ctx, problems)
    check_separate_secrets(ctx, problems)
    check_certificates(ctx, problems)
    check_uploader_to_vault(ctx, problems)
    check_network_policies(ctx, problems)
    check_namespace(ctx, problems)


# --------------------------------------------------------------------------
# kustomization trees

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "images", "patches"}
IGNORED_FILES = {".py", ".md"}


def check_tree(root, problems):
    roots = []
    for dirpath, _, files in os.walk(root):
        if "kustomization.yaml" in files:
            roots.append(dirpath)
    if not problems.check(roots, root, "no kustomization.yaml"):
        return
    referenced = set()
    for d in roots:
        where = os.path.relpath(os.path.join(d, "kustomization.yaml"), root)
        k = load_docs(os.path.join(d, "kustomization.yaml"))[0]
        unknown = set(k) - KUSTOMIZATION_KEYS
        problems.check(not unknown, where, f"fields this check does not know: {sorted(unknown)}")
        for r in k.get("resources") or []:
            p = os.path.normpath(os.path.join(d, r))
            if os.path.isdir(p):
                problems.check(os.path.exists(os.path.join(p, "kustomization.yaml")), where, f"resource {r} is a directory without kustomization.yaml")
            elif problems.check(os.path.isfile(p), where, f"resource {r} does not exist"):
                referenced.add(p)
        for g in k.get("configMapGenerator") or []:
            for f in g.get("files") or []:
                f = f.split("=", 1)[-1]
                p = os.path.normpath(os.path.join(d, f))
                if problems.check(os.path.isfile(p), where, f"configMapGenerator {g.get('name')}: {f} does not exist"):
                    referenced.add(p)
        if k.get("patches"):
            docs = resource_docs(d)
            for patch in k["patches"]:
                target = patch.get("target") or {}
                hit = [doc for doc in docs if all((doc.get("kind"), (doc.get("metadata") or {}).get("name"))[i] == target[f]
                                                  for i, f in enumerate(("kind", "name")) if f in target)]
                problems.check(hit, where, f"patch target {target.get('kind')}/{target.get('name')} matches no resource "
                                           "(kustomize skips such a patch silently)")
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.normpath(os.path.join(dirpath, f))
            if f == "kustomization.yaml" or os.path.splitext(f)[1] in IGNORED_FILES or "__pycache__" in p:
                continue
            problems.check(p in referenced, os.path.relpath(p, root),
                           "is not listed in any kustomization.yaml (resources or configMapGenerator)")


def resource_docs(directory):
    """The resources a kustomization includes (recursively), as written: only
    to find patch targets by kind and name."""
    k = load_docs(os.path.join(directory, "kustomization.yaml"))[0]
    docs = []
    for r in k.get("resources") or []:
        p = os.path.normpath(os.path.join(directory, r))
        if os.path.isdir(p) and os.path.exists(os.path.join(p, "kustomization.yaml")):
            docs += resource_docs(p)
        elif os.path.isfile(p):
            docs += load_docs(p)
    return docs


def render(directory):
    """kustomize's resources/namespace/configMapGenerator/images, without kustomize."""
    k = load_docs(os.path.join(directory, "kustomization.yaml"))[0]
    unsupported = set(k) - {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "images"}
    if unsupported:
        print(f"{directory}: needs kustomize for {sorted(unsupported)}", file=sys.stderr)
        sys.exit(3)
    docs = []
    for r in k.get("resources") or []:
        p = os.path.join(directory, r)
        docs += render(p) if os.path.isdir(p) else load_docs(p)
    for g in k.get("configMapGenerator") or []:
        data = {}
        for f in g.get("files") or []:
            key, _, f = f.rpartition("=")
            with open(os.path.join(directory, f), encoding="utf-8") as fh:
                data[key or os.path.basename(f)] = fh.read()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": g["name"]}, "data": data})
    for d in docs:
        if k.get("namespace") and d.get("kind") not in CLUSTER_SCOPED:
            d.setdefault("metadata", {})["namespace"] = k["namespace"]
        if d.get("kind") == "Namespace" and k.get("namespace"):
            d["metadata"]["name"] = k["namespace"]
        pod = ((d.get("spec") or {}).get("template") or {}).get("spec") or {}
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            for img in k.get("images") or []:
                name = re.split(r"[:@]", c["image"], maxsplit=1)[0]
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', 'latest')}"
    return docs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate")
    v.add_argument("file")
    v.add_argument("-k", "--kubernetes-version", action="append", dest="versions")
    t = sub.add_parser("tree")
    t.add_argument("dir")
    r = sub.add_parser("render")
    r.add_argument("dir")
    args = parser.parse_args()

    problems = Problems()
    if args.command == "render":
        yaml.safe_dump_all(render(args.dir), sys.stdout, sort_keys=False)
        return 0
    if args.command == "tree":
        check_tree(args.dir, problems)
        summary = f"kustomization trees under {args.dir}"
    else:
        docs = load_docs(args.file)
        versions = args.versions or ["1.29.0", "1.37.0"]
        validate_schemas(docs, versions, problems)
        check_recvault(docs, problems)
        kinds = {}
        for d in docs:
            kinds[d.get("kind")] = kinds.get(d.get("kind"), 0) + 1
        counted = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        summary = f"{len(docs)} resources ({counted}) against Kubernetes {', '.join(versions)} (strict), cert-manager.io/v1 and recvault's rules"
    for p in problems.items:
        print(f"ERROR {p}")
    if problems.items:
        print(f"FAILED: {len(problems.items)} problem(s) in {summary}")
        return 1
    print(f"OK {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
