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

/// Where Debian's `libfaketime` package puts the library (`dpkg -L libfaketime`).
const LIBFAKETIME_PATHS: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
];

/// libfaketime, which shifts a dynamically linked process's wall clock when preloaded:
/// `KLM_LIBFAKETIME` if set, else Debian's path (`make deps` installs the `faketime` package).
pub fn libfaketime() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KLM_LIBFAKETIME").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("KLM_LIBFAKETIME={} is not a file", p.display());
        }
        return Ok(p);
    }
    LIBFAKETIME_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "libfaketime not found at {LIBFAKETIME_PATHS:?}: install Debian's `faketime` \
                 package (`make deps` does, as root) or set KLM_LIBFAKETIME"
            )
        })
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
