//! Records build facts (version, git commit, enabled features, profile) as
//! compile-time environment variables read by `src/build_info.rs`.

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());

    // The crate's own features only: a stray CARGO_FEATURE_* variable in the environment
    // (e.g. a build profile's CARGO_FEATURE_FLAGS) is not a feature.
    const FEATURES: [&str; 5] = ["candle", "candle-graph", "dual", "minimal", "onnx"];
    let features: Vec<&str> = FEATURES
        .into_iter()
        .filter(|f| std::env::var_os(format!("CARGO_FEATURE_{}", f.to_uppercase().replace('-', "_"))).is_some())
        .collect();
    let features = if features.is_empty() {
        "none".to_owned()
    } else {
        features.join(",")
    };

    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".to_owned());
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_owned());

    println!("cargo:rustc-env=AEI_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=AEI_FEATURES={features}");
    println!("cargo:rustc-env=AEI_PROFILE={profile}");
    println!("cargo:rustc-env=AEI_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
    for path in [".git/HEAD", ".git/refs/heads"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
