//! A `helm` that holds the first `helm upgrade` *inside* helm, for tests that kill the coordinator
//! while its upgrade runs.
//!
//! Helm 3 records the new revision as `pending-upgrade`, then runs the chart's `pre-upgrade`
//! hooks and waits for them, then applies the manifests and marks the revision `deployed`. The
//! wrapper script puts a `pre-upgrade` hook Job into the chart of the first upgrade it sees; the
//! Job's pod can never be scheduled (no node carries its node selector), so helm waits there —
//! with the release `pending-upgrade` — until it is killed or its own `--timeout` passes.
//! Deterministic, with no sleeps: the test waits for the hook Job to exist
//! ([`HelmGate::wait_held`]), then kills whoever runs helm.
//!
//! The first restore is held too — `helm rollback`, or the coordinator's restore to the recorded
//! revision, a `helm upgrade … --reset-values -f <recorded values>` — before the real helm starts
//! (so the release is not yet touched): the wrapper writes to a FIFO, which returns once the test reads it
//! ([`HelmGate::wait_rollback_held`]), then blocks reading a second FIFO nobody writes — until
//! it is killed with whoever runs it.
//!
//! On request ([`HelmGate::hold_first_release_read`]) the first `helm get metadata` — the
//! coordinator's first look at the release, while its run is `Pending` — is held the same way,
//! for tests that kill the coordinator before it has changed anything.
//!
//! Every other helm call (and every later upgrade or rollback) goes straight to the real helm; the
//! wrapper logs each call's arguments so a test can tell a second upgrade *attempt* from none,
//! even one helm refused without a new revision.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use k8s_openapi::api::batch::v1::Job;
use kube::api::Api;

use crate::slice::Slice;
use crate::wait::{DEFAULT_TIMEOUT, wait_for, when};

/// Name of the hook Job helm waits on (in the release namespace).
pub const HELM_GATE_JOB: &str = "klm-test-helm-gate";

pub struct HelmGate {
    dir: PathBuf,
    wrapper: PathBuf,
    namespace: String,
    client: kube::Client,
}

impl Slice {
    /// Writes the gated helm wrapper into `<slice dir>/helm-gate/`; give [`HelmGate::helm_path`]
    /// to the coordinator (`--helm` or `KLM_HELM_BIN`). The wrapper expects the argv the
    /// coordinator uses: `helm upgrade <release> <chart> ... [--repo URL] [--version V] ...`.
    pub fn helm_gate(&self) -> Result<HelmGate> {
        let dir = self.dir().join("helm-gate");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::write(dir.join("gate-hook.yaml"), GATE_HOOK)?;
        for fifo in [
            "rollback-held.fifo",
            "rollback-go.fifo",
            "read-held.fifo",
            "read-go.fifo",
        ] {
            let path = dir.join(fifo);
            if !path.exists() {
                let c = std::ffi::CString::new(path.display().to_string())?;
                // SAFETY: mkfifo with a valid NUL-terminated path.
                if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("mkfifo {}", path.display()));
                }
            }
        }
        let wrapper = dir.join("helm");
        let script = WRAPPER
            .replace(
                "@REAL_HELM@",
                &self.cluster().helm_path().display().to_string(),
            )
            .replace("@GATE_DIR@", &dir.display().to_string());
        std::fs::write(&wrapper, script)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        Ok(HelmGate {
            dir,
            wrapper,
            namespace: self.kata_deploy_namespace(),
            client: self.client(),
        })
    }
}

impl HelmGate {
    /// The wrapper script (use it as the coordinator's helm).
    pub fn helm_path(&self) -> &Path {
        &self.wrapper
    }

    /// Waits until the held upgrade is inside helm: its revision is recorded `pending-upgrade`
    /// and helm waits on the hook Job.
    pub async fn wait_held(&self) -> Result<()> {
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.namespace);
        wait_for(
            &jobs,
            HELM_GATE_JOB,
            "helm to hold the upgrade on its pre-upgrade hook",
            DEFAULT_TIMEOUT,
            when(|_: &Job| true),
        )
        .await
        .map(drop)
    }

    /// Lets every `helm upgrade` straight through (for tests that hold only the rollback).
    pub fn let_upgrades_through(&self) -> Result<()> {
        std::fs::create_dir_all(self.dir.join("held"))?;
        Ok(())
    }

    /// Lets every rollback and restore straight through (for tests that hold only the upgrade).
    pub fn let_rollbacks_through(&self) -> Result<()> {
        std::fs::create_dir_all(self.dir.join("rollback-held"))?;
        Ok(())
    }

    /// Waits until the first `helm rollback` is held in the wrapper (the real helm not started).
    pub async fn wait_rollback_held(&self) -> Result<()> {
        self.wait_fifo("rollback-held.fifo", "helm rollback").await
    }

    /// Holds the first `helm get metadata` in the wrapper from now on (off by default: most
    /// tests need the release read to go through).
    pub fn hold_first_release_read(&self) -> Result<()> {
        std::fs::write(self.dir.join("hold-read"), "")?;
        Ok(())
    }

    /// Waits until the first `helm get metadata` is held in the wrapper (the real helm not
    /// started); see [`HelmGate::hold_first_release_read`].
    pub async fn wait_release_read_held(&self) -> Result<()> {
        self.wait_fifo("read-held.fifo", "helm get metadata").await
    }

    /// Reads the `held` line a held wrapper writes into `fifo` before it blocks.
    async fn wait_fifo(&self, fifo: &str, what: &str) -> Result<()> {
        let fifo = self.dir.join(fifo);
        let path = fifo.clone();
        let mut read = tokio::task::spawn_blocking(move || std::fs::read_to_string(&path));
        let text = match tokio::time::timeout(crate::wait::DEFAULT_TIMEOUT, &mut read).await {
            Ok(joined) => joined??,
            Err(_) => {
                // Unblock the reader (a blocked blocking task would hang the runtime's
                // shutdown): a writer that opens and closes gives it end-of-file.
                use std::os::unix::fs::OpenOptionsExt;
                drop(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(&fifo),
                );
                let _ = read.await;
                anyhow::bail!("timed out waiting for {what} to be held");
            }
        };
        anyhow::ensure!(
            text.trim() == "held",
            "unexpected {text:?} from the {what} gate"
        );
        Ok(())
    }

    /// The `helm rollback` calls made through the wrapper so far.
    pub fn rollback_calls(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.starts_with("rollback "))
            .collect()
    }

    /// Every helm call made through the wrapper so far, one argv (space-joined) per entry.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The `helm upgrade` calls made through the wrapper so far that move the release forward
    /// (not the restores, which are upgrades back to the recorded revision with `--reset-values`).
    pub fn upgrade_calls(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.starts_with("upgrade ") && !is_restore(c))
            .collect()
    }

    /// The restores (`helm rollback`, or an upgrade back with `--reset-values`) so far.
    pub fn restore_calls(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.starts_with("rollback ") || is_restore(c))
            .collect()
    }
}

fn is_restore(call: &str) -> bool {
    call.starts_with("upgrade ") && call.split_whitespace().any(|a| a == "--reset-values")
}

const GATE_HOOK: &str = r#"# Added by klm-testkit's helm gate: helm waits on this Job, which never runs.
apiVersion: batch/v1
kind: Job
metadata:
  name: klm-test-helm-gate
  namespace: {{ .Release.Namespace }}
  annotations:
    helm.sh/hook: pre-upgrade
    helm.sh/hook-delete-policy: before-hook-creation
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      nodeSelector:
        klm.test/helm-gate: never
      containers:
      - name: gate
        image: registry.example/helm-gate:1
"#;

const WRAPPER: &str = r#"#!/usr/bin/env bash
# klm-testkit helm gate (tests/testkit/src/helm_gate.rs): the first `helm upgrade` runs with a
# pre-upgrade hook Job that never completes, so helm holds the release `pending-upgrade`.
set -euo pipefail
real='@REAL_HELM@'
gate='@GATE_DIR@'
printf '%s\n' "$*" >>"$gate/calls.log"
restore=false
if [[ "${1:-}" == rollback || ( "${1:-}" == upgrade && " $* " == *" --reset-values "* ) ]]; then
  restore=true
fi
if ! $restore && [[ "${1:-}" == upgrade && $# -ge 3 ]] && mkdir "$gate/held" 2>/dev/null; then
  release="$2" chart="$3" repo="" version=""
  rest=()
  shift 3
  while (($#)); do
    case "$1" in
      --repo) repo="$2"; shift 2 ;;
      --version) version="$2"; shift 2 ;;
      *) rest+=("$1"); shift ;;
    esac
  done
  pulled="$gate/chart"
  rm -rf "$pulled" && mkdir -p "$pulled"
  pull=(pull "$chart" --untar --untardir "$pulled")
  [[ -z "$repo" ]] || pull+=(--repo "$repo")
  [[ -z "$version" ]] || pull+=(--version "$version")
  "$real" "${pull[@]}" >/dev/null
  dir="$(find "$pulled" -mindepth 1 -maxdepth 1 -type d | head -n1)"
  cp "$gate/gate-hook.yaml" "$dir/templates/zz-klm-test-helm-gate.yaml"
  exec "$real" upgrade "$release" "$dir" "${rest[@]}"
fi
if [[ "${1:-}" == get && "${2:-}" == metadata && -e "$gate/hold-read" ]] && mkdir "$gate/read-held" 2>/dev/null; then
  echo held >"$gate/read-held.fifo"
  read -r _ <"$gate/read-go.fifo"
fi
if $restore && mkdir "$gate/rollback-held" 2>/dev/null; then
  echo held >"$gate/rollback-held.fifo"
  read -r _ <"$gate/rollback-go.fifo"
fi
exec "$real" "$@"
"#;
