//! The systemd unit as an operator installs it: the install steps in its
//! header run, path for path, in a scratch root; the files the service reads
//! itself are readable by an unprivileged user, the secrets are not (they
//! come in as credentials); `check` passes as that user with the
//! credentials where systemd puts them; `systemd-analyze verify` accepts the
//! unit; and the binary speaks the notify protocol the unit relies on.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/systemd/arcgis-app-proxy.service"
);

/// A uid and gid no file belongs to: the service's dynamic user stand-in.
const NOBODY_ID: &str = "61234";

fn tool(name: &str) -> bool {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .any(|d| Path::new(d).join(name).exists())
}

/// The `#   install …` lines of the unit's header.
fn install_steps(unit: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix("#   install "))
        .map(|l| format!("install {l}"))
        .collect()
}

/// Reads `path` as the throwaway user; true when it could.
fn readable_as_nobody(path: &Path) -> bool {
    Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY_ID}"),
            &format!("--regid={NOBODY_ID}"),
            "--clear-groups",
            "--",
            "cat",
        ])
        .arg(path)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn install_steps_give_the_service_what_it_reads_and_nothing_more() {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !is_root || !tool("setpriv") {
        eprintln!("SKIPPED: needs root and setpriv to check files as another user");
        return;
    }
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let steps = install_steps(&unit);
    assert!(steps.len() >= 7, "{steps:?}");

    // The operator's working directory: the repository's files, a config
    // edited as the header says, a certificate and key.
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    // Every directory a step creates must be traversable by the service.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let w = work.path();
    std::fs::create_dir_all(w.join("target/release")).unwrap();
    std::fs::copy(BIN, w.join("target/release/arcgis-app-proxy")).unwrap();
    std::fs::create_dir_all(w.join("certs")).unwrap();
    std::fs::copy(pki.path("proxy.crt"), w.join("certs/proxy.crt")).unwrap();
    std::fs::copy(pki.path("proxy.key"), w.join("certs/proxy.key")).unwrap();
    std::fs::create_dir_all(w.join("deploy/systemd")).unwrap();
    std::fs::copy(UNIT, w.join("deploy/systemd/arcgis-app-proxy.service")).unwrap();
    let creds = root.path().join("run/credentials/arcgis-app-proxy.service");
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"))
        .unwrap()
        .replace(
            "tls_key = \"certs/proxy.key\"",
            &format!("tls_key = \"{}/tls-key\"", creds.display()),
        )
        .replace(
            "client_secret_env = \"ARCGIS_CLIENT_SECRET\"",
            &format!("client_secret_file = \"{}/client-secret\"", creds.display()),
        );
    assert!(
        shipped.contains("/tls-key"),
        "proxy.toml no longer names certs/proxy.key"
    );
    std::fs::write(w.join("proxy.toml"), shipped).unwrap();

    // Run each step with its absolute paths moved under the scratch root.
    let r = root.path().display().to_string();
    for step in &steps {
        let line = step
            .replace(" /usr/local/bin/", &format!(" {r}/usr/local/bin/"))
            .replace(" /etc/", &format!(" {r}/etc/"));
        let line = if line.contains(&format!("{r}/usr/local/bin/")) {
            format!("install -d -m 0755 {r}/usr/local/bin && {line}")
        } else if line.contains("/etc/systemd/system/") {
            format!("install -d -m 0755 {r}/etc/systemd/system && {line}")
        } else {
            line
        };
        let out = Command::new("bash")
            .args(["-c", &line])
            .current_dir(w)
            .env("ARCGIS_CLIENT_SECRET", SECRET)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let etc = root.path().join("etc/arcgis-app-proxy");
    // What the service reads itself: readable by an unprivileged user.
    for f in ["proxy.toml", "certs/proxy.crt"] {
        assert!(
            readable_as_nobody(&etc.join(f)),
            "{f} is not readable by the service"
        );
    }
    // What it gets as credentials: not readable by that user in place.
    for f in ["private/tls-key", "private/client-secret"] {
        assert!(etc.join(f).exists(), "{f} was not installed");
        assert!(
            !readable_as_nobody(&etc.join(f)),
            "{f} is readable by anyone"
        );
    }
    assert_eq!(
        std::fs::read_to_string(etc.join("private/client-secret"))
            .unwrap()
            .trim(),
        SECRET
    );

    // LoadCredential= as systemd does it: copies owned by the service's
    // user, mode 0400, under /run/credentials/<unit>/.
    std::fs::create_dir_all(&creds).unwrap();
    for line in unit
        .lines()
        .filter_map(|l| l.strip_prefix("LoadCredential="))
    {
        let (name, source) = line.split_once(':').unwrap();
        let source = format!("{r}{source}");
        let target = creds.join(name);
        std::fs::copy(&source, &target).unwrap_or_else(|e| panic!("{source}: {e}"));
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o400)).unwrap();
        let status = Command::new("chown")
            .arg(format!("{NOBODY_ID}:{NOBODY_ID}"))
            .arg(&target)
            .status()
            .unwrap();
        assert!(status.success());
    }
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The unit's own ExecStartPre, as the service's user: the whole config
    // validates (certificate, key, secret) without a warning about modes.
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY_ID}"),
            &format!("--regid={NOBODY_ID}"),
            "--clear-groups",
            "--",
        ])
        .arg(root.path().join("usr/local/bin/arcgis-app-proxy"))
        .args(["check", "--config"])
        .arg(etc.join("proxy.toml"))
        .env_remove("ARCGIS_CLIENT_SECRET")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(!stderr.contains("readable by group or others"), "{stderr}");

    if !tool("systemd-analyze") {
        eprintln!("SKIPPED: systemd-analyze not installed; the unit was not verified");
        return;
    }
    // The installed unit, its binary path moved under the root.
    let installed = std::fs::read_to_string(
        root.path()
            .join("etc/systemd/system/arcgis-app-proxy.service"),
    )
    .unwrap()
    .replace("/usr/local/bin/", &format!("{r}/usr/local/bin/"));
    let verify_dir = tempfile::tempdir().unwrap();
    let unit_path = verify_dir.path().join("arcgis-app-proxy.service");
    std::fs::write(&unit_path, installed).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit_path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Without a running systemd (a container) verify cannot load the
    // dependencies' units; only problems with this unit count.
    let own: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("arcgis-app-proxy.service"))
        .collect();
    assert!(out.status.success() || own.is_empty(), "{err}");
    assert!(own.is_empty(), "{err}");
}

/// The notify protocol `Type=notify` relies on: READY=1 once listening,
/// RELOADING=1 then READY=1 around a SIGHUP (also when the new config is
/// rejected), STOPPING=1 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_tells_systemd_when_it_is_ready_reloading_and_stopping() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let recv = |sock: &std::os::unix::net::UnixDatagram| {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("no notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // Reloads by SIGHUP only, so each one is this test's own.
    let cfg = write_config(
        &pki,
        "notify.toml",
        &standard_config(&fake, "").replace(
            "admin_listen = \"127.0.0.1:0\"",
            "admin_listen = \"127.0.0.1:0\"\nreload_poll_secs = 0",
        ),
    );
    let mut p = Proc::spawn(
        &["--config", &cfg],
        &[
            ("SECRET", SECRET),
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ],
    );
    p.listener("https");
    let ready = recv(&sock);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    p.signal("HUP");
    assert!(recv(&sock).starts_with("RELOADING=1"));
    let again = recv(&sock);
    assert!(
        again.starts_with("READY=1\n") && again.contains("reloaded"),
        "{again}"
    );
    // A rejected config: still READY, and the status says so.
    std::fs::write(&cfg, "[server]\nlisten = 1\n").unwrap();
    p.signal("HUP");
    assert!(recv(&sock).starts_with("RELOADING=1"));
    let rejected = recv(&sock);
    assert!(rejected.contains("rejected"), "{rejected}");
    p.signal("TERM");
    assert!(recv(&sock).starts_with("STOPPING=1"));
    let (code, logs) = p.terminate();
    assert_eq!(code, 0, "{logs}");
}
