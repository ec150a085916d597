//! Where things are: the workspace, the project's binaries, scratch directories.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The workspace root (this crate lives in `<root>/tests/testkit`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/testkit is two levels below the workspace root")
        .to_path_buf()
}

/// The directory holding the project's binaries: `KLM_BIN_DIR` if set, else the `debug`
/// profile directory of `CARGO_TARGET_DIR` (or `<root>/target`). `make test` builds them first.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KLM_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(t) if Path::new(&t).is_absolute() => PathBuf::from(t),
        Some(t) => workspace_root().join(t),
        None => workspace_root().join("target"),
    };
    target.join("debug")
}

/// The path of one of the project's binaries (`klm-agent`, `klm-coordinator`), which must exist.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.is_file() {
        bail!(
            "{} does not exist; build it first (`cargo build --bins`, which `make test` runs) \
             or point KLM_BIN_DIR at a directory holding it",
            path.display()
        );
    }
    Ok(path)
}

/// Creates a new, empty directory `<tmp>/<prefix>-<pid>-<random>`.
pub(crate) fn unique_temp_dir(prefix: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}
