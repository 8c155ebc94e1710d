//! Records build facts (version, git commit, enabled features, profile) as
//! compile-time environment variables read by `src/build_info.rs`; with the
//! `cuda` feature, also compiles the Candle backend's CUDA kernels to PTX.

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
    const FEATURES: [&str; 6] = ["candle", "candle-graph", "cuda", "dual", "minimal", "onnx"];
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
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda_kernels();
    }
    // A commit changes the branch's ref file (or packed-refs), not HEAD nor the refs
    // folder: watch the file HEAD names too, or the binary reports an older commit.
    let head_ref = std::fs::read_to_string(".git/HEAD")
        .ok()
        .and_then(|h| h.strip_prefix("ref: ").map(|r| format!(".git/{}", r.trim())));
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"]
        .into_iter()
        .map(str::to_owned)
        .chain(head_ref)
    {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

/// `src/backend/candle/gpu/kernels.cu` -> `$OUT_DIR/aei_kernels.ptx`, with the nvcc on PATH
/// (or in `$CUDA_HOME/bin`; `profiles/gpu-setup` provides one). PTX for compute capability
/// `CUDA_COMPUTE_CAP` (default 80): the driver compiles it for the GPU it finds, newer ones included.
fn cuda_kernels() {
    let src = "src/backend/candle/gpu/kernels.cu";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("aei_kernels.ptx");
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| std::path::PathBuf::from(h).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), src, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{} --ptx {src} failed ({s})", nvcc.display()),
        Err(e) => panic!(
            "the `cuda` feature needs nvcc ({}: {e}); run `eval \"$(bash profiles/gpu-setup)\"` first",
            nvcc.display()
        ),
    }
}
