//! The Kubernetes manifests render with `kubectl kustomize` (both overlays)
//! and carry what an operator relies on: probes on the admin port, secret
//! mounts read-only and 0400, a locked-down security context, a grace period
//! longer than `shutdown_grace_secs`, scrape annotations, and — for the fleet —
//! Service, HPA, PDB and NetworkPolicy; for the sidecar — the proxy on
//! localhost beside the app.

use std::path::Path;
use std::process::Command;

use serde_yaml_ng::Value;

fn render(overlay: &str) -> Option<Vec<Value>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/kubernetes/overlays")
        .join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "kustomize {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    Some(
        serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect(),
    )
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn proxy_toml(docs: &[Value]) -> toml::Table {
    let cm = kind(docs, "ConfigMap")[0];
    toml::from_str(cm["data"]["proxy.toml"].as_str().unwrap()).unwrap()
}

fn proxy_container(deploy: &Value) -> &Value {
    deploy["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some("arcgis-app-proxy"))
        .expect("proxy container")
}

fn check_common(docs: &[Value]) {
    let deploy = kind(docs, "Deployment")[0];
    let pod = &deploy["spec"]["template"]["spec"];
    let c = proxy_container(deploy);
    let cfg = proxy_toml(docs);
    // The image comes from the one `images:` entry, not a placeholder.
    let base: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/kubernetes/base/kustomization.yaml"
        ))
        .unwrap(),
    )
    .unwrap();
    let image = &base["images"][0];
    assert_eq!(
        c["image"].as_str().unwrap(),
        format!(
            "{}:{}",
            image["newName"].as_str().unwrap(),
            image["newTag"].as_str().unwrap()
        )
    );
    // Probes on the admin port, which the config binds on the pod IP.
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["port"].as_str(),
        Some("admin")
    );
    let admin_port = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("admin"))
        .unwrap()["containerPort"]
        .as_u64()
        .unwrap();
    assert_eq!(
        cfg["server"]["admin_listen"].as_str(),
        Some(format!("0.0.0.0:{admin_port}").as_str())
    );
    // The args point at the mounted config.
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        ["--config", "/etc/arcgis-app-proxy/config/proxy.toml"]
    );
    // The client secret is a read-only 0400 Secret mount where the config
    // reads it.
    let secret_file = cfg["credentials"]["online"]["client_secret_file"]
        .as_str()
        .unwrap();
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| secret_file.starts_with(m["mountPath"].as_str().unwrap()))
        .expect("secret mounted where the config reads it");
    assert_eq!(mount["readOnly"].as_bool(), Some(true));
    let vol = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert!(vol["secret"]["secretName"].as_str().is_some());
    assert_eq!(vol["secret"]["defaultMode"].as_u64(), Some(0o400));
    // Locked down.
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    // Stop: preStop, then the drain; the pod's grace covers both.
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .unwrap();
    let drain = cfg["server"]["shutdown_grace_secs"].as_integer().unwrap();
    assert!(
        grace > pre_stop + drain,
        "grace {grace} ≤ preStop {pre_stop} + drain {drain}"
    );
    // Prometheus scrapes the admin port.
    let ann = &deploy["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        ann["prometheus.io/port"].as_str(),
        Some(admin_port.to_string().as_str())
    );
}

#[test]
fn kustomize_overlays_render_with_what_operators_rely_on() {
    let Some(fleet) = render("fleet") else {
        eprintln!("SKIPPED: kubectl not installed");
        return;
    };
    check_common(&fleet);
    for k in [
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert_eq!(kind(&fleet, k).len(), 1, "fleet lacks a {k}");
    }
    let deploy = kind(&fleet, "Deployment")[0];
    assert_eq!(deploy["spec"]["replicas"].as_u64(), Some(3));
    let cfg = proxy_toml(&fleet);
    assert!(cfg["server"]["listen"].as_str().is_some());
    // TLS from a Secret, where the config reads it.
    let c = proxy_container(deploy);
    let tls_cert = cfg["server"]["tls_cert"].as_str().unwrap();
    assert!(
        c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|m| tls_cert.starts_with(m["mountPath"].as_str().unwrap()))
    );
    // Egress: DNS and 443 only.
    let np = kind(&fleet, "NetworkPolicy")[0];
    let ports: Vec<u64> = np["spec"]["egress"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|r| r["ports"].as_sequence().unwrap().iter())
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert!(ports.iter().all(|p| [53, 443].contains(p)), "{ports:?}");

    let sidecar = render("sidecar").unwrap();
    check_common(&sidecar);
    let deploy = kind(&sidecar, "Deployment")[0];
    assert_eq!(deploy["metadata"]["name"].as_str(), Some("web-app"));
    let containers = deploy["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap();
    assert_eq!(containers.len(), 2, "app + proxy sidecar");
    let cfg = proxy_toml(&sidecar);
    assert_eq!(
        cfg["server"]["plain_listen"].as_str(),
        Some("127.0.0.1:8080")
    );
    assert!(cfg["server"].get("listen").is_none());
    assert!(
        kind(&sidecar, "Service").is_empty(),
        "the sidecar is not exposed"
    );
}
