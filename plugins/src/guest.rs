//! Builds the guest workspace (`plugins/guest`: the SDK, the example
//! plugins, the hostile test plugin) to WebAssembly, once per process, for
//! tests: `cargo build --target wasm32-wasip2 --release`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The repository's `plugins/` directory.
pub fn plugins_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the guest plugins (once per process) and returns the directory
/// holding `keyword_filter.wasm`, `rate_filter.wasm` and `hostile.wasm`.
/// Panics with what to do when the wasm32-wasip2 target is missing.
pub fn build() -> PathBuf {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match DIR.get_or_init(build_inner) {
        Ok(dir) => dir.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// The path of one built guest plugin, e.g. `wasm("keyword_filter")`.
pub fn wasm(name: &str) -> PathBuf {
    build().join(format!("{name}.wasm"))
}

fn build_inner() -> Result<PathBuf, String> {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| plugins_dir().join("..").join("target"))
        .join("guest");
    if Command::new("rustup").arg("--version").output().is_ok() {
        let installed = Command::new("rustup").args(["target", "list", "--installed"]).output().map_err(|e| e.to_string())?;
        if !String::from_utf8_lossy(&installed.stdout).lines().any(|l| l.trim() == "wasm32-wasip2") {
            return Err("the wasm32-wasip2 target is missing: run rustup target add wasm32-wasip2".into());
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = plugins_dir().join("guest").join("Cargo.toml");
    let out = Command::new(cargo)
        .args(["build", "--target", "wasm32-wasip2", "--release", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        // The host build's flags are not for the guest.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .map_err(|e| format!("cannot run cargo to build the guest plugins: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = if stderr.contains("wasm32-wasip2") && stderr.contains("target may not be installed") {
            "the wasm32-wasip2 target is missing: run rustup target add wasm32-wasip2\n"
        } else {
            ""
        };
        return Err(format!("{hint}building the guest plugins failed ({}):\n{stderr}", manifest.display()));
    }
    Ok(target_dir.join("wasm32-wasip2").join("release"))
}
