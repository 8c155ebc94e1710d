//! Build facts recorded by `build.rs`: shown by `--version`, in the status
//! message and as the `build_info` metric. Owns nothing else.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_COMMIT: &str = env!("AEI_GIT_COMMIT");
/// Enabled Cargo features, comma-separated (`none` when there are none).
pub const FEATURES: &str = env!("AEI_FEATURES");
pub const PROFILE: &str = env!("AEI_PROFILE");
pub const TARGET: &str = env!("AEI_TARGET");

/// One line for `--version` and logs.
pub fn line() -> String {
    format!(
        "ai-edge-inference {VERSION} (commit {GIT_COMMIT}, features {FEATURES}, profile {PROFILE}, target {TARGET})"
    )
}
