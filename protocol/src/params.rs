//! Run parameters: chart defaults overridden per run by trigger annotations, validated up front.
//! Every check here runs before the coordinator touches anything, so a bad input ends the run
//! with a message and no side effect.
use crate::duration::{format_duration, parse_timeout};
use crate::keys::{node::DEFAULT_SELECTOR, trigger};
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
    /// The chart value `defaults.deploymentMode` (`auto` unless set).
    pub deployment_mode: crate::kata_deploy::RequestedMode,
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
    pub fn selector(&self) -> LabelSelector {
        // Validated when the params were resolved.
        LabelSelector::parse(&self.node_selector).unwrap_or_default()
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
        deployment_mode,
    })
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
    format!(
        "release {}/{} -> {}; nodes by {}; drain {} ({}); verification in {} (timeout {}){extra}",
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
            deployment_mode: Default::default(),
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
}
