//! `kubectl kata-lifecycle`: triggers, steers and watches kata-lifecycle-manager runs by writing
//! the trigger ConfigMap annotations the README documents (what `request` decides) and showing
//! the run record (the view `klm-coordinator status` shows too).
mod request;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use klm_protocol::RunRecord;
use klm_protocol::keys::{defaults, status_data, trigger};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use request::{Changes, UpgradePlan, UpgradeRequest};
use std::time::Duration;

/// The namespace the README installs the chart into.
const DEFAULT_NAMESPACE: &str = "kata-lifecycle-manager";

#[derive(Debug, Parser)]
#[command(
    name = "kubectl kata-lifecycle",
    bin_name = "kubectl-kata_lifecycle",
    version,
    about = "Upgrade kata-deploy node by node with kata-lifecycle-manager"
)]
struct Cli {
    /// Namespace of kata-lifecycle-manager (its trigger ConfigMap).
    #[arg(short = 'n', long, global = true, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Name of the trigger ConfigMap.
    #[arg(long, global = true, default_value = defaults::TRIGGER_CONFIGMAP)]
    configmap: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a run to <version> (parameters not given keep their current annotation values).
    Upgrade(Box<UpgradeArgs>),
    /// Show the run: phase, progress, nodes with elapsed times, failure evidence.
    Status {
        /// Redraw on every change; return once a run seen in progress has finished.
        #[arg(long)]
        watch: bool,
        /// Print the raw run record (JSON) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Stop the run and roll back what it did (a node mid-procedure stops at a safe point).
    Cancel,
    /// Grant no new node turn once the nodes in progress finish.
    Pause,
    /// Continue a paused run.
    Resume,
    /// Roll one node of the last upgrade run back by hand.
    Rollback {
        /// The node to restore.
        node: String,
    },
    /// Print a shell completion script.
    Completion { shell: clap_complete::Shell },
}

#[derive(Debug, clap::Args)]
struct UpgradeArgs {
    /// kata-deploy chart version to move to, e.g. 3.28.0.
    version: String,
    /// Label selector of the nodes, e.g. `node-pool=kata,zone in (a,b)`.
    #[arg(long)]
    selector: Option<String>,
    /// Select nodes with a taint of this key.
    #[arg(long)]
    taint_key: Option<String>,
    /// With --taint-key: only this taint value.
    #[arg(long)]
    taint_value: Option<String>,
    /// Evict the node's pods before upgrading it (`--drain=false` turns a previous one off).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    drain: Option<bool>,
    /// Bound of one node's drain, e.g. 600s, 10m.
    #[arg(long)]
    drain_timeout: Option<String>,
    /// Bound of one verification pod, e.g. 300s, 5m.
    #[arg(long)]
    verification_timeout: Option<String>,
    /// File with the verification pod YAML (sent base64-encoded).
    #[arg(long, value_name = "FILE")]
    verification_pod: Option<std::path::PathBuf>,
    /// Extra `key=value` for the run's `helm upgrade` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// kata-deploy Helm release name.
    #[arg(long)]
    release: Option<String>,
    /// Namespace of the kata-deploy release.
    #[arg(long)]
    release_namespace: Option<String>,
    /// When node turns may start, e.g. "Mon-Fri 22:00-06:00 Europe/Berlin" ("" : always).
    #[arg(long)]
    maintenance_window: Option<String>,
    /// Pods that hold their node's turn while one runs there, e.g. app=backup ("" : none).
    #[arg(long)]
    blocking_pod_selector: Option<String>,
    /// Waves: at most this many nodes in progress at once (1 to 50; 1 = one by one).
    #[arg(long, value_name = "N")]
    batch_size: Option<u32>,
    /// Waves: with --batch-size above 1, a first wave of one node (`--canary=false` turns it off).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    canary: Option<bool>,
}

/// How long `upgrade` waits for the coordinator to see `target-version` removed before setting
/// it again (only when re-requesting the trigger it last acted on).
const REMOVAL_SEEN_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let target = Target {
        namespace: cli.namespace.clone(),
        configmap: cli.configmap.clone(),
    };
    match cli.command {
        Command::Completion { shell } => {
            use std::io::Write;
            // Written by us, not by clap_complete (which panics on a closed pipe, e.g. `| head`).
            match std::io::stdout().write_all(&completion(shell)) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
        Command::Status { watch, json } => {
            let view = klm_kube::status_view::ViewArgs {
                namespace: target.namespace,
                configmap: target.configmap,
                watch,
                json,
            };
            Ok(klm_kube::status_view::show(client().await?, &view).await?)
        }
        Command::Cancel => target.patch(&request::action(trigger::ACTION_CANCEL)).await,
        Command::Pause => target.patch(&request::action(trigger::ACTION_PAUSE)).await,
        Command::Resume => target.patch(&request::action(trigger::ACTION_RESUME)).await,
        Command::Rollback { node } => target.patch(&request::rollback(&node)?).await,
        Command::Upgrade(args) => upgrade(&target, *args).await,
    }
}

/// The completion script for `shell`, for the `kubectl-kata_lifecycle` executable.
fn completion(shell: clap_complete::Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "kubectl-kata_lifecycle",
        &mut script,
    );
    script
}

async fn client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("no Kubernetes configuration: set KUBECONFIG or use ~/.kube/config")
}

struct Target {
    namespace: String,
    configmap: String,
}

impl Target {
    async fn api(&self) -> anyhow::Result<Api<ConfigMap>> {
        Ok(Api::namespaced(client().await?, &self.namespace))
    }

    async fn patch(&self, changes: &Changes) -> anyhow::Result<()> {
        self.patch_with(&self.api().await?, changes).await?;
        println!(
            "configmap {}/{} annotated: {}",
            self.namespace,
            self.configmap,
            describe(changes)
        );
        Ok(())
    }

    async fn patch_with(&self, cms: &Api<ConfigMap>, changes: &Changes) -> anyhow::Result<()> {
        cms.patch(
            &self.configmap,
            &PatchParams::default(),
            &Patch::Merge(request::merge_patch(changes)),
        )
        .await
        .with_context(|| {
            format!(
                "cannot annotate ConfigMap {}/{}",
                self.namespace, self.configmap
            )
        })?;
        Ok(())
    }
}

fn describe(changes: &Changes) -> String {
    changes
        .iter()
        .map(|(k, v)| {
            let short = k.trim_start_matches(klm_protocol::keys::TRIGGER_PREFIX);
            match v {
                // The verification pod is long base64: its presence is what matters here.
                Some(_) if *k == trigger::VERIFICATION_POD => format!("{short}=<pod yaml>"),
                Some(v) => format!("{short}={}", v.replace('\n', ";")),
                None => format!("{short}-"),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn upgrade(target: &Target, args: UpgradeArgs) -> anyhow::Result<()> {
    let verification_pod = match &args.verification_pod {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        ),
        None => None,
    };
    let req = UpgradeRequest {
        version: args.version,
        selector: args.selector,
        taint_key: args.taint_key,
        taint_value: args.taint_value,
        drain: args.drain,
        drain_timeout: args.drain_timeout,
        verification_timeout: args.verification_timeout,
        verification_pod,
        set_values: args.set,
        release: args.release,
        release_namespace: args.release_namespace,
        maintenance_window: args.maintenance_window,
        blocking_pod_selector: args.blocking_pod_selector,
        batch_size: args.batch_size,
        canary: args.canary,
    };
    // Bad input is reported before anything is read or written.
    request::upgrade_changes(&req)?;
    let cms = target.api().await?;
    let cm = cms.get(&target.configmap).await.with_context(|| {
        format!(
            "cannot read ConfigMap {}/{} (is kata-lifecycle-manager installed there? see -n)",
            target.namespace, target.configmap
        )
    })?;
    let annotations = cm.metadata.annotations.clone().unwrap_or_default();
    let data = cm.data.clone().unwrap_or_default();
    let observed = data
        .get(status_data::OBSERVED_TRIGGER)
        .cloned()
        .unwrap_or_default();
    let run = data
        .get(status_data::RUN)
        .and_then(|s| RunRecord::from_json(s).ok());
    let changes = match request::plan_upgrade(&req, &annotations, &observed, run.as_ref())? {
        UpgradePlan::Patch(changes) => changes,
        UpgradePlan::RemoveTargetThenPatch(changes) => {
            target.patch_with(&cms, &request::remove_target()).await?;
            println!("same request as the last run: removed target-version first");
            wait_removal_seen(target, &cms).await?;
            changes
        }
    };
    target.patch_with(&cms, &changes).await?;
    println!(
        "run requested on configmap {}/{}: {}\nfollow it with: kubectl kata-lifecycle status --watch -n {}",
        target.namespace,
        target.configmap,
        describe(&changes),
        target.namespace
    );
    Ok(())
}

/// Waits (watch) until the coordinator's `observedTrigger` is empty, i.e. it has seen the
/// target removed, so setting the same annotations again is a new request to it.
async fn wait_removal_seen(target: &Target, cms: &Api<ConfigMap>) -> anyhow::Result<()> {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", target.configmap));
    let mut stream = std::pin::pin!(
        watcher(cms.clone(), cfg)
            .default_backoff()
            .applied_objects()
    );
    let seen = async {
        while let Some(cm) = stream.next().await {
            let cm = cm?;
            let observed = cm
                .data
                .as_ref()
                .and_then(|d| d.get(status_data::OBSERVED_TRIGGER))
                .map(String::as_str)
                .unwrap_or_default();
            if observed.is_empty() {
                return Ok(());
            }
        }
        anyhow::bail!("the watch of the trigger ConfigMap ended")
    };
    tokio::time::timeout(REMOVAL_SEEN_TIMEOUT, seen)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the coordinator did not acknowledge the removal of target-version within {}s; \
                 is it running (namespace {})? Run the upgrade again once it is",
                REMOVAL_SEEN_TIMEOUT.as_secs(),
                target.namespace
            )
        })?
}

#[cfg(test)]
mod cli_tests {
    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn completion_scripts_name_the_subcommands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let script = String::from_utf8(completion(shell)).unwrap();
            for sub in ["upgrade", "status", "cancel", "pause", "resume", "rollback"] {
                assert!(script.contains(sub), "{shell}: {sub}");
            }
            assert!(script.contains("kubectl-kata_lifecycle"), "{shell}");
        }
    }

    #[test]
    fn parses_upgrade_flags_and_defaults() {
        let cli = Cli::try_parse_from([
            "kubectl-kata_lifecycle",
            "upgrade",
            "3.28.0",
            "--drain",
            "--set",
            "a=1",
            "--set",
            "b=2",
        ])
        .unwrap();
        assert_eq!(cli.namespace, "kata-lifecycle-manager");
        assert_eq!(cli.configmap, "kata-lifecycle-manager");
        let Command::Upgrade(u) = cli.command else {
            panic!("not upgrade")
        };
        assert_eq!(u.drain, Some(true));
        assert_eq!(u.set, vec!["a=1", "b=2"]);
        let cli = Cli::try_parse_from([
            "kubectl-kata_lifecycle",
            "-n",
            "ops",
            "upgrade",
            "3.28.0",
            "--drain=false",
        ])
        .unwrap();
        assert_eq!(cli.namespace, "ops");
        let Command::Upgrade(u) = cli.command else {
            panic!("not upgrade")
        };
        assert_eq!(u.drain, Some(false));
        assert_eq!((u.batch_size, u.canary), (None, None));
        let cli = Cli::try_parse_from([
            "kubectl-kata_lifecycle",
            "upgrade",
            "3.28.0",
            "--batch-size",
            "3",
            "--canary=false",
        ])
        .unwrap();
        let Command::Upgrade(u) = cli.command else {
            panic!("not upgrade")
        };
        assert_eq!((u.batch_size, u.canary), (Some(3), Some(false)));
    }
}
