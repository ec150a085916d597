//! Run parameters: chart defaults overridden per run by trigger annotations, validated up front.
//! Every check here runs before the coordinator touches anything, so a bad input ends the run
//! with a message and no side effect.
use crate::duration::{format_duration, parse_timeout};
use crate::keys::{node::DEFAULT_SELECTOR, trigger};
use crate::maintenance_window::MaintenanceWindow;
use crate::selector::{LabelSelector, valid_key, valid_value};
use crate::verification::PodTemplate;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Defaults, as the chart's `defaults.*` values set them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    pub helm_release: String,
    pub helm_namespace: String,
    pub node_selector: String,
    pub node_taint_key: String,
    pub node_taint_value: String,
    pub verification_namespace: String,
    /// The verification pod YAML; empty when the chart was installed without one.
    pub verification_pod: String,
    pub drain_enabled: bool,
    pub drain_timeout: Duration,
    pub verification_timeout: Duration,
    /// ServiceAccounts a verification pod may name besides `default`
    /// (chart value `verification.serviceAccounts`).
    pub verification_service_accounts: Vec<String>,
    /// Extra values for every run's `helm upgrade` (chart value `defaults.helmSetValues`).
    pub helm_set_values: String,
    /// When node turns may start (chart value `defaults.maintenanceWindow`); empty: always.
    pub maintenance_window: String,
    /// Pods that hold a node's turn (chart value `defaults.blockingPodSelector`); empty: none.
    pub blocking_pod_selector: String,
    /// Regex on the names of firing Prometheus alerts that hold the run (chart value
    /// `defaults.prometheus.alertFilter`, set only with `defaults.prometheus.url`); empty: no
    /// alert gate.
    pub alert_filter: String,
    /// Nodes in progress at once (chart value `defaults.batchSize`; 1 = one by one).
    pub batch_size: u32,
    /// With `batch_size` > 1, a first wave of one node (chart value `defaults.canary`).
    pub canary: bool,
    /// The chart value `defaults.deploymentMode` (`auto` unless set).
    pub deployment_mode: crate::kata_deploy::RequestedMode,
}

/// The largest `batch-size`: one upgrade Lease per slot, and the chart's RBAC names each
/// slot's Lease (`templates/agent-rbac.yaml`), so the bound is part of the chart's contract.
pub const MAX_BATCH_SIZE: u32 = 50;

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

fn yes() -> bool {
    true
}

/// The fully resolved, validated parameters of one run. Serialized into the run record so the
/// agents act on exactly what the coordinator validated.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunParams {
    pub target_version: String,
    pub helm_release: String,
    pub helm_namespace: String,
    /// The effective label selector (may be empty when a taint key selects the nodes).
    pub node_selector: String,
    pub node_taint_key: String,
    pub node_taint_value: String,
    pub verification_namespace: String,
    /// Verification pod YAML with `${NODE}` / `${TEST_POD}` placeholders.
    pub verification_pod: String,
    pub drain_enabled: bool,
    pub drain_timeout_seconds: u64,
    pub verification_timeout_seconds: u64,
    /// Validated `--set` entries (`key=value`) for the run's `helm upgrade`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub helm_set_values: Vec<String>,
    /// `drain-enabled` was given per run (a hazard of the deployed version may turn the drain
    /// on only when it was not, see `kata_deploy::drain_decision`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain_chosen: bool,
    /// Validated maintenance window text (`maintenance_window`); empty: always open.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub maintenance_window: String,
    /// Validated label selector of pods that hold their node's turn; empty: no pod gate.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub blocking_pod_selector: String,
    /// Validated regex (whole alert name) of the firing Prometheus alerts that hold the run;
    /// empty: no alert gate.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub alert_filter: String,
    /// Waves: at most this many nodes in progress at once (records written before waves
    /// existed read as 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub batch_size: u32,
    /// Waves: the first wave is one node, so a bad target version fails on one node before
    /// `batch_size` nodes are cordoned at once. Meaningless when `batch_size` is 1.
    #[serde(default = "yes")]
    pub canary: bool,
    /// The `deployment-mode` asked for; the mode the run works in is decided against the
    /// release (see `kata_deploy::resolve_mode`) and recorded in the run's release state.
    #[serde(
        default,
        skip_serializing_if = "crate::kata_deploy::RequestedMode::is_auto"
    )]
    pub deployment_mode: crate::kata_deploy::RequestedMode,
}

impl RunParams {
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_seconds)
    }
    pub fn verification_timeout(&self) -> Duration {
        Duration::from_secs(self.verification_timeout_seconds)
    }
    /// Nodes in progress at once, never 0 (a hand-edited record with 0 still makes progress).
    pub fn wave_size(&self) -> usize {
        self.batch_size.clamp(1, MAX_BATCH_SIZE) as usize
    }
    pub fn selector(&self) -> LabelSelector {
        // Validated when the params were resolved.
        LabelSelector::parse(&self.node_selector).unwrap_or_default()
    }
    /// The firing alerts among `firing` that hold the run (the filter matches the whole name).
    pub fn blocking_alerts(&self, firing: &[String]) -> Vec<String> {
        if self.alert_filter.is_empty() {
            return Vec::new();
        }
        match alert_regex(&self.alert_filter) {
            Ok(re) => firing.iter().filter(|n| re.is_match(n)).cloned().collect(),
            // Validated when the params were resolved; a hand-edited record's bad filter
            // matches everything rather than nothing (a gate that cannot be read holds).
            Err(_) => firing.to_vec(),
        }
    }
    /// The run's maintenance window (validated when the params were resolved; a hand-edited
    /// record with a bad one gets "always open" rather than a panic).
    pub fn window(&self) -> MaintenanceWindow {
        MaintenanceWindow::parse(&self.maintenance_window)
            .or_else(|_| MaintenanceWindow::parse(""))
            .expect("an empty window parses")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamError {
    #[error(
        "no target version: annotate the trigger ConfigMap with {key}=<version>, e.g. 3.28.0",
        key = trigger::TARGET_VERSION
    )]
    MissingTarget,
    #[error("bad target version {0:?}: expected a chart version such as 3.28.0 ({1})")]
    Version(String, String),
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error(
        "no verification pod: install the chart with --set-file defaults.verificationPod=./verify.yaml \
         or set {key} to the base64 of the pod YAML",
        key = trigger::VERIFICATION_POD
    )]
    MissingVerificationPod,
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ParamError {
    ParamError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// Validates a chart version: semantic version, no leading `v` (kata-deploy charts have none).
pub fn validate_version(v: &str) -> Result<semver::Version, ParamError> {
    semver::Version::parse(v).map_err(|e| ParamError::Version(v.to_string(), e.to_string()))
}

/// DNS-1123 label (namespace and release names).
fn validate_dns_label(key: &'static str, v: &str) -> Result<String, ParamError> {
    let b = v.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ok {
        Ok(v.to_string())
    } else {
        Err(invalid(
            key,
            format!("{v:?} is not a valid name (lowercase letters, digits and '-', at most 63)"),
        ))
    }
}

fn parse_bool(key: &'static str, v: &str) -> Result<bool, ParamError> {
    match v.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(invalid(key, format!("{other:?} is not true or false"))),
    }
}

/// Resolves a run's parameters from trigger annotations over the defaults, validating all.
pub fn resolve(
    annotations: &BTreeMap<String, String>,
    defaults: &Defaults,
) -> Result<RunParams, ParamError> {
    let get = |k: &str| annotations.get(k).map(|s| s.trim().to_string());
    let target = get(trigger::TARGET_VERSION)
        .filter(|s| !s.is_empty())
        .ok_or(ParamError::MissingTarget)?;
    validate_version(&target)?;

    let helm_release = validate_dns_label(
        trigger::HELM_RELEASE,
        &get(trigger::HELM_RELEASE).unwrap_or_else(|| defaults.helm_release.clone()),
    )?;
    let helm_namespace = validate_dns_label(
        trigger::HELM_NAMESPACE,
        &get(trigger::HELM_NAMESPACE).unwrap_or_else(|| defaults.helm_namespace.clone()),
    )?;
    let verification_namespace = validate_dns_label(
        trigger::VERIFICATION_NAMESPACE,
        &get(trigger::VERIFICATION_NAMESPACE)
            .unwrap_or_else(|| defaults.verification_namespace.clone()),
    )?;

    let taint_key = get(trigger::NODE_TAINT_KEY).unwrap_or_else(|| defaults.node_taint_key.clone());
    let taint_value =
        get(trigger::NODE_TAINT_VALUE).unwrap_or_else(|| defaults.node_taint_value.clone());
    if !taint_key.is_empty() {
        valid_key(&taint_key).map_err(|r| invalid(trigger::NODE_TAINT_KEY, r))?;
    }
    if !taint_value.is_empty() {
        if taint_key.is_empty() {
            return Err(invalid(
                trigger::NODE_TAINT_VALUE,
                "a taint value needs a taint key (set node-taint-key too)",
            ));
        }
        valid_value(&taint_value).map_err(|r| invalid(trigger::NODE_TAINT_VALUE, r))?;
    }
    let selector = get(trigger::NODE_SELECTOR).unwrap_or_else(|| defaults.node_selector.clone());
    // An empty selector with no taint key would select every node; use the opt-in label instead.
    let selector = if selector.is_empty() && taint_key.is_empty() {
        DEFAULT_SELECTOR.to_string()
    } else {
        selector
    };
    LabelSelector::parse(&selector).map_err(|e| invalid(trigger::NODE_SELECTOR, e.to_string()))?;

    let drain_chosen = get(trigger::DRAIN_ENABLED).is_some();
    let drain_enabled = match get(trigger::DRAIN_ENABLED) {
        Some(v) => parse_bool(trigger::DRAIN_ENABLED, &v)?,
        None => defaults.drain_enabled,
    };
    let duration = |key: &'static str, default: Duration| match get(key) {
        Some(v) => parse_timeout(&v).map_err(|e| invalid(key, e.to_string())),
        None => Ok(default),
    };
    let drain_timeout = duration(trigger::DRAIN_TIMEOUT, defaults.drain_timeout)?;
    let verification_timeout =
        duration(trigger::VERIFICATION_TIMEOUT, defaults.verification_timeout)?;

    let verification_pod = match get(trigger::VERIFICATION_POD) {
        Some(b64) => decode_pod(&b64)?,
        None => defaults.verification_pod.clone(),
    };
    if verification_pod.trim().is_empty() {
        return Err(ParamError::MissingVerificationPod);
    }
    let template = PodTemplate::parse(&verification_pod)
        .map_err(|e| invalid(trigger::VERIFICATION_POD, e.to_string()))?;
    crate::pod_policy::check(&template, &defaults.verification_service_accounts)
        .map_err(|e| invalid(trigger::VERIFICATION_POD, e.to_string()))?;
    let set_values =
        get(trigger::HELM_SET_VALUES).unwrap_or_else(|| defaults.helm_set_values.clone());
    let helm_set_values = crate::helm_values::parse(&set_values)
        .map_err(|e| invalid(trigger::HELM_SET_VALUES, e))?
        .iter()
        .map(crate::helm_values::SetValue::to_arg)
        .collect();
    let maintenance_window =
        get(trigger::MAINTENANCE_WINDOW).unwrap_or_else(|| defaults.maintenance_window.clone());
    MaintenanceWindow::parse(&maintenance_window)
        .map_err(|e| invalid(trigger::MAINTENANCE_WINDOW, e.to_string()))?;
    let blocking_pod_selector = get(trigger::BLOCKING_POD_SELECTOR)
        .unwrap_or_else(|| defaults.blocking_pod_selector.clone());
    LabelSelector::parse(&blocking_pod_selector).map_err(|e| {
        invalid(
            trigger::BLOCKING_POD_SELECTOR,
            format!(
                "bad pod selector {:?}: {}; write it like app=backup,tier in (db,cache)",
                e.selector, e.reason
            ),
        )
    })?;

    let alert_filter = defaults.alert_filter.trim().to_string();
    if !alert_filter.is_empty() {
        alert_regex(&alert_filter).map_err(|e| invalid(ALERT_FILTER_VALUE, e.to_string()))?;
    }

    let batch_size = match get(trigger::BATCH_SIZE) {
        Some(v) => parse_batch_size(&v)?,
        None => defaults.batch_size,
    };
    if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
        return Err(invalid(
            trigger::BATCH_SIZE,
            format!(
                "the chart default defaults.batchSize={batch_size} is not between 1 and {MAX_BATCH_SIZE}"
            ),
        ));
    }
    let canary = match get(trigger::CANARY) {
        Some(v) => parse_bool(trigger::CANARY, &v)?,
        None => defaults.canary,
    };
    let deployment_mode = match get(trigger::DEPLOYMENT_MODE) {
        Some(v) => crate::kata_deploy::RequestedMode::parse(&v)
            .map_err(|e| invalid(trigger::DEPLOYMENT_MODE, e))?,
        None => defaults.deployment_mode,
    };

    Ok(RunParams {
        target_version: target,
        helm_release,
        helm_namespace,
        node_selector: selector,
        node_taint_key: taint_key,
        node_taint_value: taint_value,
        verification_namespace,
        verification_pod,
        drain_enabled,
        drain_timeout_seconds: drain_timeout.as_secs().max(1),
        verification_timeout_seconds: verification_timeout.as_secs().max(1),
        helm_set_values,
        drain_chosen,
        maintenance_window: maintenance_window.trim().to_string(),
        blocking_pod_selector: blocking_pod_selector.trim().to_string(),
        alert_filter,
        batch_size,
        canary,
        deployment_mode,
    })
}

/// The chart value that sets the alert gate's filter (not a trigger annotation: the Prometheus
/// URL and what blocks are cluster policy).
pub const ALERT_FILTER_VALUE: &str = "defaults.prometheus.alertFilter";

fn alert_regex(filter: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{filter})$"))
}

/// `batch-size`: a whole number of nodes, 1 to [`MAX_BATCH_SIZE`].
fn parse_batch_size(v: &str) -> Result<u32, ParamError> {
    let n: u32 = v.parse().map_err(|_| {
        invalid(
            trigger::BATCH_SIZE,
            format!("{v:?} is not a whole number of nodes (1 to {MAX_BATCH_SIZE})"),
        )
    })?;
    if !(1..=MAX_BATCH_SIZE).contains(&n) {
        return Err(invalid(
            trigger::BATCH_SIZE,
            format!(
                "{n} is out of range: at least 1 and at most {MAX_BATCH_SIZE} nodes in progress at once"
            ),
        ));
    }
    Ok(n)
}

fn decode_pod(b64: &str) -> Result<String, ParamError> {
    let compact: String = b64.split_whitespace().collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| {
            invalid(
                trigger::VERIFICATION_POD,
                format!("not valid base64 ({e}); encode the YAML with `base64 -w0 < pod.yaml`"),
            )
        })?;
    String::from_utf8(bytes).map_err(|_| {
        invalid(
            trigger::VERIFICATION_POD,
            "decoded bytes are not UTF-8 text",
        )
    })
}

/// A human summary of the parameters for Events and logs.
pub fn describe(p: &RunParams) -> String {
    let mut sel = Vec::new();
    if !p.node_selector.is_empty() {
        sel.push(format!("labels {}", p.node_selector));
    }
    if !p.node_taint_key.is_empty() {
        let v = if p.node_taint_value.is_empty() {
            String::new()
        } else {
            format!("={}", p.node_taint_value)
        };
        sel.push(format!("taint {}{v}", p.node_taint_key));
    }
    let extra = if p.helm_set_values.is_empty() {
        String::new()
    } else {
        format!("; helm --set {}", p.helm_set_values.join(" --set "))
    };
    let waves = match (p.wave_size(), p.canary) {
        (1, _) => String::new(),
        (n, true) => format!("; waves of {n} nodes after a one-node canary"),
        (n, false) => format!("; waves of {n} nodes"),
    };
    let mut extra = extra;
    if !p.maintenance_window.is_empty() {
        extra.push_str(&format!("; maintenance window {}", p.maintenance_window));
    }
    if !p.blocking_pod_selector.is_empty() {
        extra.push_str(&format!(
            "; nodes held by pods matching {}",
            p.blocking_pod_selector
        ));
    }
    format!(
        "release {}/{} -> {}; nodes by {}; drain {} ({}); verification in {} (timeout {}){waves}{extra}",
        p.helm_namespace,
        p.helm_release,
        p.target_version,
        sel.join(" and "),
        if p.drain_enabled { "on" } else { "off" },
        format_duration(p.drain_timeout()),
        p.verification_namespace,
        format_duration(p.verification_timeout()),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: ${TEST_POD}\nspec:\n  restartPolicy: Never\n  nodeSelector:\n    kubernetes.io/hostname: ${NODE}\n  containers:\n  - name: verify\n    image: busybox\n";

    pub(crate) fn defaults() -> Defaults {
        Defaults {
            helm_release: "kata-deploy".into(),
            helm_namespace: "kube-system".into(),
            node_selector: String::new(),
            node_taint_key: String::new(),
            node_taint_value: String::new(),
            verification_namespace: "default".into(),
            verification_pod: POD.into(),
            drain_enabled: false,
            drain_timeout: Duration::from_secs(300),
            verification_timeout: Duration::from_secs(300),
            verification_service_accounts: Vec::new(),
            helm_set_values: String::new(),
            batch_size: 1,
            canary: true,
            maintenance_window: String::new(),
            blocking_pod_selector: String::new(),
            alert_filter: String::new(),
            deployment_mode: Default::default(),
        }
    }

    #[test]
    fn the_alert_filter_matches_whole_names_and_a_bad_one_is_refused() {
        let mut d = defaults();
        d.alert_filter = "Node.*|KubeAPIDown".into();
        let p = resolve(&ann(&[(trigger::TARGET_VERSION, "3.28.0")]), &d).unwrap();
        let firing: Vec<String> = [
            "NodeDiskPressure",
            "Watchdog",
            "KubeAPIDownSoon",
            "KubeAPIDown",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            p.blocking_alerts(&firing),
            ["NodeDiskPressure", "KubeAPIDown"]
        );
        assert!(RunParams::default().blocking_alerts(&firing).is_empty());
        d.alert_filter = "Node(".into();
        let e = resolve(&ann(&[(trigger::TARGET_VERSION, "3.28.0")]), &d)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(ALERT_FILTER_VALUE), "{e}");
    }

    #[test]
    fn window_and_blocking_selector_default_from_the_chart_and_are_validated() {
        let mut d = defaults();
        d.maintenance_window = "Sat,Sun 00:00-24:00".into();
        d.blocking_pod_selector = "app=backup".into();
        let p = resolve(&ann(&[(trigger::TARGET_VERSION, "3.28.0")]), &d).unwrap();
        assert_eq!(p.maintenance_window, "Sat,Sun 00:00-24:00");
        assert_eq!(p.blocking_pod_selector, "app=backup");
        assert!(!p.window().is_always_open());
        assert!(describe(&p).contains("maintenance window Sat,Sun 00:00-24:00"));
        // The annotations replace the defaults; an empty annotation turns the gate off.
        let p = resolve(
            &ann(&[
                (trigger::TARGET_VERSION, "3.28.0"),
                (
                    trigger::MAINTENANCE_WINDOW,
                    " Mon-Fri 22:00-06:00 Europe/Berlin ",
                ),
                (trigger::BLOCKING_POD_SELECTOR, ""),
            ]),
            &d,
        )
        .unwrap();
        assert_eq!(p.maintenance_window, "Mon-Fri 22:00-06:00 Europe/Berlin");
        assert_eq!(p.blocking_pod_selector, "");
        for (key, value, needle) in [
            (
                trigger::MAINTENANCE_WINDOW,
                "Mon-Fri 22:00",
                "not a time range",
            ),
            (
                trigger::MAINTENANCE_WINDOW,
                "22:00-06:00 Nowhere/City",
                "unknown time zone",
            ),
            (
                trigger::BLOCKING_POD_SELECTOR,
                "app in backup",
                "bad pod selector",
            ),
        ] {
            let e = resolve(
                &ann(&[(trigger::TARGET_VERSION, "3.28.0"), (key, value)]),
                &d,
            )
            .unwrap_err()
            .to_string();
            assert!(e.starts_with(key) && e.contains(needle), "{value}: {e}");
        }
    }

    #[test]
    fn helm_set_values_become_separate_entries_and_pacing_keys_are_refused() {
        let mut d = defaults();
        d.helm_set_values = "debug=true".into();
        let p = resolve(&ann(&[(trigger::TARGET_VERSION, "3.28.0")]), &d).unwrap();
        assert_eq!(p.helm_set_values, ["debug=true"]);
        // The annotation replaces the chart default.
        let p = resolve(
            &ann(&[
                (trigger::TARGET_VERSION, "3.28.0"),
                (
                    trigger::HELM_SET_VALUES,
                    "image.reference=mirror.example/kd\nshims.disableAll=true",
                ),
            ]),
            &d,
        )
        .unwrap();
        assert_eq!(
            p.helm_set_values,
            ["image.reference=mirror.example/kd", "shims.disableAll=true"]
        );
        assert!(describe(&p).contains("--set shims.disableAll=true"));
        let e = resolve(
            &ann(&[
                (trigger::TARGET_VERSION, "3.28.0"),
                (
                    trigger::HELM_SET_VALUES,
                    "updateStrategy.type=RollingUpdate",
                ),
            ]),
            &d,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("helm-set-values") && e.contains("cannot be set per run"),
            "{e}"
        );
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_apply_and_empty_selection_means_the_window_label() {
        let p = resolve(&ann(&[(trigger::TARGET_VERSION, "3.28.0")]), &defaults()).unwrap();
        assert_eq!(p.node_selector, DEFAULT_SELECTOR);
        assert_eq!(p.helm_release, "kata-deploy");
        assert_eq!(p.drain_timeout_seconds, 300);
        assert!(!p.drain_enabled);
    }

    #[test]
    fn taint_only_selection_has_no_label_selector() {
        let p = resolve(
            &ann(&[
                (trigger::TARGET_VERSION, "3.28.0"),
                (trigger::NODE_TAINT_KEY, "kata-lifecycle-manager"),
                (trigger::NODE_TAINT_VALUE, "pending"),
            ]),
            &defaults(),
        )
        .unwrap();
        assert_eq!(p.node_selector, "");
        assert_eq!(p.node_taint_value, "pending");
    }

    #[test]
    fn overrides_apply() {
        let b64 =
            base64::engine::general_purpose::STANDARD.encode(POD.replace("busybox", "alpine"));
        let p = resolve(
            &ann(&[
                (trigger::TARGET_VERSION, "3.29.0-rc1"),
                (trigger::HELM_RELEASE, "kd"),
                (trigger::HELM_NAMESPACE, "kata-system"),
                (trigger::NODE_SELECTOR, "pool=kata"),
                (trigger::VERIFICATION_NAMESPACE, "verify"),
                (trigger::VERIFICATION_POD, &b64),
                (trigger::DRAIN_ENABLED, "true"),
                (trigger::DRAIN_TIMEOUT, "10m"),
                (trigger::VERIFICATION_TIMEOUT, "90s"),
            ]),
            &defaults(),
        )
        .unwrap();
        assert_eq!(
            (p.helm_release.as_str(), p.helm_namespace.as_str()),
            ("kd", "kata-system")
        );
        assert!(p.verification_pod.contains("alpine"));
        assert!(p.drain_enabled);
        assert_eq!(p.drain_timeout_seconds, 600);
        assert_eq!(p.verification_timeout_seconds, 90);
    }

    #[test]
    fn bad_inputs_are_rejected_with_the_key_named() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
            (vec![], "no target version"),
            (
                vec![(trigger::TARGET_VERSION, "latest".into())],
                "bad target version",
            ),
            (
                vec![(trigger::TARGET_VERSION, "v3.28.0".into())],
                "bad target version",
            ),
            (
                vec![(trigger::NODE_SELECTOR, "a in b".into())],
                trigger::NODE_SELECTOR,
            ),
            (
                vec![(trigger::DRAIN_TIMEOUT, "5 minutes".into())],
                trigger::DRAIN_TIMEOUT,
            ),
            (
                vec![(trigger::DRAIN_ENABLED, "yes".into())],
                trigger::DRAIN_ENABLED,
            ),
            (vec![(trigger::VERIFICATION_POD, "%%%".into())], "base64"),
            (
                vec![(trigger::VERIFICATION_POD, b64("a: [unclosed"))],
                trigger::VERIFICATION_POD,
            ),
            (
                vec![(
                    trigger::VERIFICATION_POD,
                    b64("kind: Service\napiVersion: v1\n"),
                )],
                "Pod",
            ),
            (
                vec![(
                    trigger::VERIFICATION_POD,
                    b64(&POD.replace("Never", "Always")),
                )],
                "restartPolicy",
            ),
            (
                vec![(trigger::HELM_RELEASE, "Bad_Name".into())],
                trigger::HELM_RELEASE,
            ),
            (vec![(trigger::NODE_TAINT_VALUE, "x".into())], "taint key"),
        ];
        for (pairs, needle) in cases {
            let mut a: BTreeMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            if needle != "no target version" {
                a.entry(trigger::TARGET_VERSION.into())
                    .or_insert_with(|| "3.28.0".into());
            }
            let err = resolve(&a, &defaults()).unwrap_err().to_string();
            assert!(err.contains(needle), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn out_of_range_timeouts_are_rejected_with_a_message() {
        for (key, value) in [
            (trigger::DRAIN_TIMEOUT, "10000000000000000000"),
            (trigger::DRAIN_TIMEOUT, "25h"),
            (trigger::VERIFICATION_TIMEOUT, "500ms"),
        ] {
            let a = ann(&[(trigger::TARGET_VERSION, "3.28.0"), (key, value)]);
            let err = resolve(&a, &defaults()).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains("between 1s and 24h"),
                "{value}: {err}"
            );
        }
    }

    #[test]
    fn missing_verification_pod_says_how_to_give_one() {
        let d = Defaults {
            verification_pod: String::new(),
            ..defaults()
        };
        let err = resolve(&ann(&[(trigger::TARGET_VERSION, "3.28.0")]), &d)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--set-file defaults.verificationPod"), "{err}");
    }

    #[test]
    fn batch_size_defaults_to_one_by_one_and_is_bounded() {
        let target = [(trigger::TARGET_VERSION, "3.28.0")];
        let p = resolve(&ann(&target), &defaults()).unwrap();
        assert_eq!((p.batch_size, p.wave_size()), (1, 1));
        let p = resolve(
            &ann(&[
                target[0],
                (trigger::BATCH_SIZE, " 4 "),
                (trigger::CANARY, "false"),
            ]),
            &defaults(),
        )
        .unwrap();
        assert_eq!((p.batch_size, p.canary), (4, false));
        assert!(
            describe(&p).contains("waves of 4 nodes"),
            "{}",
            describe(&p)
        );
        for bad in ["0", "-1", "two", "1.5", "51", ""] {
            let err = resolve(&ann(&[target[0], (trigger::BATCH_SIZE, bad)]), &defaults())
                .unwrap_err()
                .to_string();
            assert!(err.contains(trigger::BATCH_SIZE), "{bad:?}: {err}");
        }
        let err = resolve(&ann(&[target[0], (trigger::CANARY, "maybe")]), &defaults())
            .unwrap_err()
            .to_string();
        assert!(err.contains(trigger::CANARY), "{err}");
        let bad_default = Defaults {
            batch_size: 0,
            ..defaults()
        };
        let err = resolve(&ann(&target), &bad_default)
            .unwrap_err()
            .to_string();
        assert!(err.contains("defaults.batchSize=0"), "{err}");
    }

    #[test]
    fn records_from_before_waves_read_as_one_by_one() {
        let mut json = serde_json::to_value(
            resolve(&ann(&[(trigger::TARGET_VERSION, "3.28.0")]), &defaults()).unwrap(),
        )
        .unwrap();
        assert!(
            json.get("batchSize").is_none(),
            "batch-size 1 is not written: {json}"
        );
        json.as_object_mut().unwrap().remove("canary");
        let p: RunParams = serde_json::from_value(json).unwrap();
        assert_eq!((p.batch_size, p.canary), (1, true));
    }
}
