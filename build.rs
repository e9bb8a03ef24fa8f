//! Build metadata for `--version` and `arcgis_proxy_build_info`: the git
//! commit (or `AAP_GIT_COMMIT`, for builds without `.git` such as the Docker
//! build stage) and the build profile (`AAP_BUILD_PROFILE`, set by
//! `bench/pgo-build`; `plain` otherwise).

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=AAP_GIT_COMMIT");
    println!("cargo:rerun-if-env-changed=AAP_BUILD_PROFILE");
    let commit = std::env::var("AAP_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".into());
    // Only characters that are safe in a label value and a version line.
    let commit: String = commit
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(40)
        .collect();
    println!("cargo:rustc-env=AAP_GIT_COMMIT={commit}");
    let profile = match std::env::var("AAP_BUILD_PROFILE").as_deref() {
        Ok("profile-guided") => "profile-guided",
        Ok("instrumented") => "instrumented",
        _ => "plain",
    };
    println!("cargo:rustc-env=AAP_BUILD_PROFILE={profile}");
}

/// The checked-out commit, watching the files that change when it moves.
fn git_commit() -> Option<String> {
    if !Path::new(".git").exists() {
        return None;
    }
    let mut watch = vec![".git/HEAD".to_string(), ".git/packed-refs".to_string()];
    if let Ok(head) = std::fs::read_to_string(".git/HEAD")
        && let Some(r) = head.strip_prefix("ref: ")
    {
        watch.push(format!(".git/{}", r.trim()));
    }
    for f in watch.iter().filter(|f| Path::new(f).exists()) {
        println!("cargo:rerun-if-changed={f}");
    }
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
