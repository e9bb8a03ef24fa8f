//! Packaging: the Dockerfile's build stage copies in every file the build
//! reads. CI has no Docker daemon, so instead of building the image this
//! compares its `COPY` lines with what the manifest, the sources'
//! `include_str!`/`include_bytes!` and the `RUN` steps' scripts need.

use std::path::{Component, Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Context paths the Dockerfile copies from (not `COPY --from=` another
/// stage), relative to the repository root.
fn copied(dockerfile: &str) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for line in dockerfile.lines() {
        let Some(args) = line.trim().strip_prefix("COPY ") else {
            continue;
        };
        let args: Vec<&str> = args.split_whitespace().collect();
        if args.iter().any(|a| a.starts_with("--from=")) {
            continue;
        }
        let sources = &args[..args.len().saturating_sub(1)];
        paths.extend(sources.iter().map(|s| lexical(Path::new(s))));
    }
    paths
}

/// Relative paths of repository files named in the Dockerfile's `RUN` steps
/// (scripts such as `bench/pgo-build`), continuation lines joined; build
/// outputs under `target/` are made there, not copied.
fn run_scripts(dockerfile: &str) -> Vec<PathBuf> {
    let joined = dockerfile.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.trim().strip_prefix("RUN "))
        .flat_map(|l| l.split(|c: char| c.is_whitespace() || c == ';'))
        .filter(|t| t.contains('/') && !t.starts_with('/') && !t.starts_with('-'))
        .map(|t| lexical(Path::new(t)))
        .filter(|p| !p.starts_with("target") && Path::new(ROOT).join(p).is_file())
        .collect()
}

/// `a/./b/../c` → `a/c`, without touching the file system.
fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every file `cargo build --release --bin arcgis-app-proxy` reads from the
/// repository, relative to its root.
fn build_inputs() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    let mut inputs: Vec<PathBuf> = ["Cargo.toml", "Cargo.lock", ".cargo/config.toml"]
        .into_iter()
        .map(PathBuf::from)
        .collect();
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(root.join("Cargo.toml")).unwrap()).unwrap();
    // Cargo runs a build script at the package root without being told.
    if root.join("build.rs").exists() {
        inputs.push(PathBuf::from("build.rs"));
    }
    // Cargo reads every declared target while loading the manifest.
    for bench in manifest["bench"].as_array().unwrap() {
        inputs.push(PathBuf::from(format!(
            "benches/{}.rs",
            bench["name"].as_str().unwrap()
        )));
    }
    let mut sources = Vec::new();
    rust_files(&root.join("src"), &mut sources);
    for file in sources {
        let text = std::fs::read_to_string(&file).unwrap();
        let dir = file.parent().unwrap().strip_prefix(root).unwrap();
        for mac in ["include_str!(\"", "include_bytes!(\""] {
            for (at, _) in text.match_indices(mac) {
                let rest = &text[at + mac.len()..];
                let included = &rest[..rest.find('"').unwrap()];
                inputs.push(lexical(&dir.join(included)));
            }
        }
        inputs.push(file.strip_prefix(root).unwrap().to_path_buf());
    }
    inputs
}

fn missing(inputs: &[PathBuf], dockerfile: &str) -> Vec<PathBuf> {
    let copies = copied(dockerfile);
    inputs
        .iter()
        .filter(|i| !copies.iter().any(|c| i.starts_with(c)))
        .cloned()
        .collect()
}

#[test]
fn docker_build_stage_copies_every_build_input() {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let mut inputs = build_inputs();
    for input in &inputs {
        assert!(
            Path::new(ROOT).join(input).is_file(),
            "{} is read by the build but does not exist",
            input.display()
        );
    }
    // The scan sees the demo's embedded page, so it can see a missing one.
    assert!(inputs.contains(&PathBuf::from("demo/index.html")));
    inputs.extend(run_scripts(&dockerfile));
    assert_eq!(missing(&inputs, &dockerfile), Vec::<PathBuf>::new());
}

#[test]
fn the_copy_check_finds_what_a_dockerfile_leaves_out() {
    let inputs = [
        PathBuf::from("Cargo.toml"),
        PathBuf::from("src/demo.rs"),
        PathBuf::from("demo/index.html"),
        PathBuf::from("bench/pgo-build"),
    ];
    let without_demo = "FROM rust AS build\n\
        COPY Cargo.toml ./\n\
        COPY src ./src\n\
        COPY bench/pgo-build ./bench/pgo-build\n\
        FROM scratch\n\
        COPY --from=build /demo /demo\n";
    assert_eq!(
        missing(&inputs, without_demo),
        vec![PathBuf::from("demo/index.html")]
    );
    let with_parent = without_demo.replace("COPY src ./src", "COPY src/../demo ./demo");
    assert_eq!(
        missing(&inputs, &with_parent),
        vec![PathBuf::from("src/demo.rs")]
    );
    assert_eq!(
        run_scripts("RUN a \\\n  && bench/pgo-build --x; /usr/bin/strip y\n"),
        vec![PathBuf::from("bench/pgo-build")]
    );
}
