//! The helm CLI, always as an argv array (never through a shell), with its stderr kept for
//! error messages. In daemonset mode one upgrade per run and one rollback on failure, no helm
//! call per node; in job mode one upgrade scoped by `job.nodes` per node (and per restored node).
use klm_protocol::install::job_nodes_set_value;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

#[derive(Debug, Clone)]
pub struct Helm {
    pub bin: String,
    pub chart_ref: String,
    /// `--repo` URL for classic (non-OCI) chart repositories and mirrors.
    pub chart_repo: Option<String>,
}

/// `helm get metadata -o json` of the latest revision.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ReleaseMetadata {
    pub name: String,
    pub chart: String,
    pub version: String,
    pub namespace: String,
    pub revision: u32,
    pub status: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HelmError {
    #[error(
        "release {release:?} not found in namespace {namespace:?}: install kata-deploy with helm first, or set lifecycle.katacontainers.io/helm-release / helm-namespace"
    )]
    NotFound { release: String, namespace: String },
    #[error("`helm {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error(
        "could not run helm ({bin}): {source}; is helm installed and on PATH (or KLM_HELM_BIN set)?"
    )]
    Spawn { bin: String, source: std::io::Error },
    #[error("unexpected output from helm: {0}")]
    Output(String),
}

impl Helm {
    async fn run(&self, args: &[String]) -> Result<String, HelmError> {
        // argv is logged and copied into Events and the run record: never with credentials.
        let shown: Vec<String> = args.iter().map(|a| redact(a)).collect();
        tracing::info!(helm = %self.bin, args = ?shown, "running helm");
        let out = Command::new(&self.bin)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| HelmError::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(HelmError::Failed {
                args: shown.join(" "),
                stderr: redact(String::from_utf8_lossy(&out.stderr).trim()),
            })
        }
    }

    pub async fn metadata(
        &self,
        release: &str,
        namespace: &str,
    ) -> Result<ReleaseMetadata, HelmError> {
        let args = strings(&["get", "metadata", release, "-n", namespace, "-o", "json"]);
        match self.run(&args).await {
            Ok(out) => {
                serde_json::from_str(&out).map_err(|e| HelmError::Output(format!("{e}: {out}")))
            }
            Err(HelmError::Failed { stderr, .. }) if stderr.contains("not found") => {
                Err(HelmError::NotFound {
                    release: release.into(),
                    namespace: namespace.into(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// The release's `deploymentMode` value as the chart renders it (`helm get values --all`:
    /// the chart's defaults merged with the user's), `None` when the chart has no such value.
    pub async fn deployment_mode(
        &self,
        release: &str,
        namespace: &str,
    ) -> Result<Option<String>, HelmError> {
        let args = strings(&[
            "get", "values", release, "-n", namespace, "--all", "-o", "json",
        ]);
        let out = self.run(&args).await?;
        deployment_mode_value(&out)
    }

    /// The argv of the run's single upgrade (kept separate so it is unit-tested).
    pub fn upgrade_args(
        &self,
        release: &str,
        namespace: &str,
        version: &str,
        set_values: &[String],
    ) -> Vec<String> {
        let mut args = strings(&[
            "upgrade",
            release,
            &self.chart_ref,
            "-n",
            namespace,
            "--version",
            version,
        ]);
        if let Some(repo) = &self.chart_repo {
            args.extend(strings(&["--repo", repo]));
        }
        args.push("--reset-then-reuse-values".into());
        // The run's own values (validated: none of them touches what pacing depends on), each
        // a separate argv entry, before ours so that ours would win anyway.
        for v in set_values {
            args.extend(["--set".to_string(), v.clone()]);
        }
        args.extend(strings(&[
            // Nothing moves until each agent deletes its own node's pod.
            "--set",
            "updateStrategy.type=OnDelete",
            // kata-deploy's own verification is cluster-wide with a fixed pod name.
            "--set",
            "verification.pod=",
        ]));
        args
    }

    pub async fn upgrade(
        &self,
        release: &str,
        namespace: &str,
        version: &str,
        set_values: &[String],
    ) -> Result<(), HelmError> {
        self.run(&self.upgrade_args(release, namespace, version, set_values))
            .await
            .map(|_| ())
    }

    /// The argv that puts the release back to the recorded chart `version` with the recorded
    /// revision's user values (`values_file`, from `helm get values --revision`), still
    /// `OnDelete`: each upgraded node is then restored by its own restore turn, one at a time.
    /// Not `helm rollback <revision>`: that restores the revision's `updateStrategy` too, and a
    /// default install's `RollingUpdate` lets the DaemonSet controller replace every upgraded
    /// node's pod at once — no cordon, no Lease, no verification. No `--wait` either: Helm 4's
    /// (kstatus) never finishes on an `OnDelete` DaemonSet, and each restore turn waits for its
    /// own node's pod; `--timeout` still bounds the chart's hooks.
    pub fn restore_args(
        &self,
        release: &str,
        namespace: &str,
        version: &str,
        values_file: &str,
        timeout: Duration,
    ) -> Vec<String> {
        let mut args = strings(&[
            "upgrade",
            release,
            &self.chart_ref,
            "-n",
            namespace,
            "--version",
            version,
        ]);
        if let Some(repo) = &self.chart_repo {
            args.extend(strings(&["--repo", repo]));
        }
        args.extend(strings(&[
            "--reset-values",
            "-f",
            values_file,
            "--set",
            "updateStrategy.type=OnDelete",
            "--set",
            "verification.pod=",
            "--timeout",
            &format!("{}s", timeout.as_secs().max(1)),
        ]));
        args
    }

    /// Restores the release to the recorded revision (see [`Helm::restore_args`]).
    pub async fn restore(
        &self,
        release: &str,
        namespace: &str,
        revision: u32,
        version: &str,
        clear_pending: Option<u32>,
        timeout: Duration,
    ) -> Result<(), HelmError> {
        if let Some(to) = clear_pending {
            self.run(&strings(&[
                "rollback",
                release,
                &to.to_string(),
                "-n",
                namespace,
                "--timeout",
                &format!("{}s", timeout.as_secs().max(1)),
            ]))
            .await?;
        }
        let path = self
            .revision_values_file(release, namespace, revision)
            .await?;
        let result = self
            .run(&self.restore_args(
                release,
                namespace,
                version,
                &path.display().to_string(),
                timeout,
            ))
            .await;
        let _ = std::fs::remove_file(&path);
        result.map(|_| ())
    }

    /// The user values of `revision` (`helm get values --revision`) in a private file, for
    /// `-f`; the caller removes it.
    async fn revision_values_file(
        &self,
        release: &str,
        namespace: &str,
        revision: u32,
    ) -> Result<std::path::PathBuf, HelmError> {
        let values = self
            .run(&strings(&[
                "get",
                "values",
                release,
                "-n",
                namespace,
                "--revision",
                &revision.to_string(),
                "-o",
                "json",
            ]))
            .await?;
        // A revision installed without user values prints `null`.
        let values = match values.trim() {
            "" | "null" => "{}".to_string(),
            v => v.to_string(),
        };
        // helm's homes are writable (an emptyDir under /tmp in the chart); the file holds the
        // release's own values, so it is private to this process and removed right after.
        let path = std::env::temp_dir().join(format!(
            "klm-restore-{namespace}-{release}-{revision}-{}.json",
            std::process::id()
        ));
        write_private(&path, &values).map_err(|source| HelmError::Spawn {
            bin: format!("(writing {})", path.display()),
            source,
        })?;
        Ok(path)
    }

    /// Job mode: one scoped install (see [`klm_protocol::install`]). An upgrade is the run's
    /// upgrade argv; a restore is the restore argv back to `version` with the values of
    /// `restore_values_of`. Either way `job.nodes` lists exactly `nodes`, so kata-deploy's
    /// dispatcher installs there and nowhere else.
    #[allow(clippy::too_many_arguments)]
    pub async fn scoped_install(
        &self,
        release: &str,
        namespace: &str,
        version: &str,
        nodes: &BTreeSet<String>,
        set_values: &[String],
        restore_values_of: Option<u32>,
        timeout: Duration,
    ) -> Result<(), HelmError> {
        let scope = ["--set".to_string(), job_nodes_set_value(nodes)];
        match restore_values_of {
            None => {
                let mut args = self.upgrade_args(release, namespace, version, set_values);
                args.extend(scope);
                self.run(&args).await.map(|_| ())
            }
            Some(revision) => {
                let path = self
                    .revision_values_file(release, namespace, revision)
                    .await?;
                let mut args = self.restore_args(
                    release,
                    namespace,
                    version,
                    &path.display().to_string(),
                    timeout,
                );
                args.extend(scope);
                let result = self.run(&args).await;
                let _ = std::fs::remove_file(&path);
                result.map(|_| ())
            }
        }
    }
}

/// `deploymentMode` out of `helm get values --all -o json` output.
fn deployment_mode_value(json: &str) -> Result<Option<String>, HelmError> {
    let values: serde_json::Value = match json.trim() {
        "" | "null" => return Ok(None),
        text => serde_json::from_str(text)
            .map_err(|e| HelmError::Output(format!("helm get values: {e}")))?,
    };
    match values.get("deploymentMode") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(HelmError::Output(format!(
            "the release's deploymentMode value is {other}, not a string"
        ))),
    }
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// `text` with the user-info part of every URL in it (`scheme://user:password@host`) replaced
/// by `***`, so a chart repository's credentials never reach logs, Events or the run record.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', '?', '#' or whitespace.
        let end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deployment_mode_is_read_from_the_values() {
        assert_eq!(
            deployment_mode_value(r#"{"deploymentMode":"job","job":{"nodes":[]}}"#).unwrap(),
            Some("job".to_string())
        );
        assert_eq!(deployment_mode_value(r#"{"shims":{}}"#).unwrap(), None);
        assert_eq!(deployment_mode_value("null").unwrap(), None);
        assert!(deployment_mode_value(r#"{"deploymentMode":3}"#).is_err());
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redact("--repo https://bob:s3cret@charts.example.com/kata?x=1"),
            "--repo https://***@charts.example.com/kata?x=1"
        );
        assert_eq!(
            redact("oci://token@ghcr.io/kata and http://plain.example/x"),
            "oci://***@ghcr.io/kata and http://plain.example/x"
        );
        assert_eq!(redact("no url here"), "no url here");
        assert_eq!(redact("user@host is not a URL"), "user@host is not a URL");
    }

    #[tokio::test]
    async fn a_failing_helm_reports_its_argv_redacted() {
        let h = Helm {
            bin: "false".into(),
            chart_ref: "oci://robot:pa55@registry.example/kata-deploy".into(),
            chart_repo: None,
        };
        let e = h
            .upgrade("kd", "ns", "3.28.0", &[])
            .await
            .unwrap_err()
            .to_string();
        assert!(!e.contains("pa55") && !e.contains("robot"), "{e}");
        assert!(e.contains("oci://***@registry.example/kata-deploy"), "{e}");
    }

    #[test]
    fn upgrade_argv_is_exact() {
        let h = Helm {
            bin: "helm".into(),
            chart_ref: "kata-deploy".into(),
            chart_repo: Some("http://127.0.0.1:1".into()),
        };
        assert_eq!(
            h.upgrade_args(
                "kata-deploy",
                "kube-system",
                "3.28.0",
                &[
                    "image.reference=mirror.example/kd".into(),
                    "debug=true".into()
                ]
            )
            .join(" "),
            "upgrade kata-deploy kata-deploy -n kube-system --version 3.28.0 --repo http://127.0.0.1:1 \
             --reset-then-reuse-values --set image.reference=mirror.example/kd --set debug=true \
             --set updateStrategy.type=OnDelete --set verification.pod="
        );
        assert_eq!(
            h.restore_args(
                "kd",
                "ns",
                "3.27.0",
                "/tmp/v.json",
                Duration::from_secs(300)
            )
            .join(" "),
            "upgrade kd kata-deploy -n ns --version 3.27.0 --repo http://127.0.0.1:1 --reset-values \
             -f /tmp/v.json --set updateStrategy.type=OnDelete --set verification.pod= --timeout 300s"
        );
    }
}
