//! The image the chart deploys: the Dockerfile builds every source the binary needs, ships
//! only the binary on a non-root base whose user is the chart's, and passes hadolint when it
//! is installed (RDPHEALTH_REQUIRE_HADOLINT=1 makes it required).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Dockerfile instructions (continuation lines joined, comments dropped).
fn instructions() -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

/// The instructions of the last stage.
fn runtime_stage() -> Vec<String> {
    let all = instructions();
    let last_from = all.iter().rposition(|i| i.starts_with("FROM ")).unwrap();
    all[last_from..].to_vec()
}

#[test]
fn runtime_stage_ships_only_the_binary_as_the_charts_user() {
    let stage = runtime_stage();
    let from = &stage[0];
    assert!(
        from.contains("distroless") && from.ends_with(":nonroot"),
        "{from}"
    );
    let copies: Vec<&String> = stage.iter().filter(|i| i.starts_with("COPY")).collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert!(copies[0].starts_with("COPY --from=build ") && copies[0].ends_with(" /rdphealth"));
    assert!(stage.contains(&"ENTRYPOINT [\"/rdphealth\"]".to_string()));
    assert!(stage.contains(&"CMD [\"run\"]".to_string()));
    assert!(
        !stage.iter().any(|i| i.starts_with("RUN ")),
        "no shell in the runtime"
    );

    let user = stage
        .iter()
        .find_map(|i| i.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    let uid: u64 = user.split(':').next().unwrap().parse().unwrap();
    assert_ne!(uid, 0);
    let values: serde_json::Value =
        serde_saphyr::from_str(&read("charts/rdphealth-operator/values.yaml")).unwrap();
    assert_eq!(
        values["podSecurityContext"]["runAsUser"], uid,
        "the chart runs the image as its own user"
    );
    assert!(stage.iter().any(|i| i == "EXPOSE 8080"));
    assert_eq!(values["metrics"]["port"], 8080);
}

#[test]
fn dependencies_are_built_before_the_sources_are_copied() {
    let all = instructions();
    let pos = |needle: &str| {
        all.iter()
            .position(|i| i.starts_with(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in the Dockerfile"))
    };
    let manifests = pos("COPY Cargo.toml Cargo.lock");
    let sources = pos("COPY src ");
    let first_build = all
        .iter()
        .position(|i| i.contains("cargo build --release --locked"))
        .unwrap();
    assert!(manifests < first_build && first_build < sources, "{all:#?}");
    assert!(all[first_build].contains("benches/codec.rs"), "bench stub");
    let last_build = all
        .iter()
        .rposition(|i| i.contains("cargo build --release --locked"))
        .unwrap();
    assert!(last_build > sources);
}

#[test]
fn the_build_copies_every_file_the_sources_include() {
    let all = instructions();
    let copied: Vec<String> = all
        .iter()
        .filter(|i| i.starts_with("COPY ") && !i.contains("--from="))
        .flat_map(|i| {
            let parts: Vec<&str> = i.split_whitespace().skip(1).collect();
            parts[..parts.len() - 1]
                .iter()
                .map(|s| s.trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let ignore = read(".dockerignore");
    for path in &copied {
        assert!(
            ignore
                .lines()
                .any(|l| l.trim_end_matches('/') == format!("!{path}")),
            ".dockerignore excludes {path}, which the Dockerfile copies"
        );
    }
    // Every include_str!/include_bytes! target must be inside a copied directory.
    let mut stack = vec![root().join("src")];
    let mut includes = 0;
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = fs::read_to_string(&path).unwrap();
            for part in text.split("include_str!(\"").skip(1) {
                let rel = part.split('"').next().unwrap();
                let target: PathBuf = path.parent().unwrap().join(rel);
                let target = target.canonicalize().unwrap();
                let inside = target.strip_prefix(root().canonicalize().unwrap()).unwrap();
                let top = inside.components().next().unwrap().as_os_str();
                assert!(
                    copied.iter().any(|c| c.as_str() == top),
                    "{} includes {}, which the image build does not copy",
                    path.display(),
                    inside.display()
                );
                includes += 1;
            }
        }
    }
    assert!(includes >= 1);
}

#[test]
fn build_toolchain_is_new_enough() {
    let all = instructions();
    let arg = all
        .iter()
        .find_map(|i| i.strip_prefix("ARG RUST_VERSION="))
        .unwrap();
    let manifest = read("Cargo.toml");
    let needed = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .unwrap()
        .trim_end_matches('"');
    let version = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(
        version(arg) >= version(needed),
        "Dockerfile builds with {arg}, Cargo.toml needs {needed}"
    );
}

#[test]
fn hadolint_accepts_the_dockerfile() {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("hadolint"))
            .find(|p| p.is_file())
    });
    let Some(hadolint) = found else {
        assert!(
            std::env::var("RDPHEALTH_REQUIRE_HADOLINT").as_deref() != Ok("1"),
            "hadolint is required (RDPHEALTH_REQUIRE_HADOLINT=1) but not on PATH"
        );
        eprintln!("note: hadolint not found, skipping; set RDPHEALTH_REQUIRE_HADOLINT=1 to fail");
        return;
    };
    let out = Command::new(hadolint)
        .arg("Dockerfile")
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
