//! The gate in front of every new *upgrade* turn (and in front of the run's start): the
//! maintenance window, firing Prometheus alerts matching the chart's filter, and the blocking
//! pods on the node about to take its turn. One pure
//! decision, so "held or not, until when, and why" lives in one place; the run machine calls
//! it right before it would grant, records the hold in the run and asks to be woken when the
//! window opens.
//!
//! Restore turns after a failure or a cancel are never gated: putting the fleet back on one
//! version matters more than the window or a blocking pod.
use crate::maintenance_window::MaintenanceWindow;
use serde::{Deserialize, Serialize};

/// Why a run is held; a bounded set (it is a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HoldReason {
    /// Outside the maintenance window.
    MaintenanceWindow,
    /// A pod matching the blocking-pod selector runs on the node about to take its turn (or
    /// the pods have not been listed yet).
    BlockingPod,
    /// A Prometheus alert matching the filter fires (or Prometheus could not be asked yet).
    PrometheusAlert,
}

impl HoldReason {
    pub const ALL: [HoldReason; 3] = [
        HoldReason::MaintenanceWindow,
        HoldReason::BlockingPod,
        HoldReason::PrometheusAlert,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldReason::MaintenanceWindow => "maintenance_window",
            HoldReason::BlockingPod => "blocking_pod",
            HoldReason::PrometheusAlert => "prometheus_alert",
        }
    }
}

/// A held run, as recorded in the run (`run.json`) for the status view, the plugin and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hold {
    pub reason: HoldReason,
    /// When the hold ends by itself (the window opens), Unix ms; `None` when only a change
    /// (a blocking pod going away) ends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<i64>,
    /// The node whose turn is held (none when the run's start is held).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `namespace/name` of the pods that block the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocking_pods: Vec<String>,
    /// Names of the firing alerts that hold the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firing_alerts: Vec<String>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Open,
    Hold(Hold),
}

/// A pod matched by the blocking-pod selector, as the coordinator's watch sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockingPod {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName` (unset while the pod is not scheduled).
    pub node: Option<String>,
    /// `status.phase`.
    pub phase: String,
}

impl BlockingPod {
    /// kured's semantics: only a pod that is running or about to run holds the node; a
    /// finished (`Succeeded`/`Failed`) one does not.
    pub fn blocks(&self) -> bool {
        matches!(self.phase.as_str(), "Running" | "Pending")
    }
}

/// The blocking-pod check of the node about to take its turn.
#[derive(Debug, Clone, Copy)]
pub struct PodCheck<'a> {
    pub selector: &'a str,
    /// Every pod the selector matches; `None` until the watch has listed them (unknown
    /// holds: a grant is never made on a guess).
    pub pods: Option<&'a [BlockingPod]>,
}

/// What the Prometheus alert gate knows (the coordinator polls Prometheus's alerts API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alerts<'a> {
    /// No alert gate configured.
    NotGated,
    /// Configured, not answered yet.
    NotAsked,
    /// The last poll failed (the error): holds, as kured does, rather than guess.
    Unreachable(&'a str),
    /// The firing alerts whose name matches the filter (none: open).
    Firing(&'a [String]),
}

/// The names of the firing alerts in an answer of Prometheus's `GET /api/v1/alerts`
/// (`{"status":"success","data":{"alerts":[{"labels":{"alertname":…},"state":"firing"},…]}}`);
/// pending (not yet firing) alerts do not count.
pub fn firing_alert_names(body: &str) -> Result<Vec<String>, String> {
    #[derive(Deserialize)]
    struct Answer {
        status: String,
        #[serde(default)]
        data: Option<Data>,
        #[serde(default)]
        error: Option<String>,
    }
    #[derive(Deserialize)]
    struct Data {
        #[serde(default)]
        alerts: Vec<Alert>,
    }
    #[derive(Deserialize)]
    struct Alert {
        #[serde(default)]
        labels: std::collections::BTreeMap<String, String>,
        #[serde(default)]
        state: String,
    }
    let answer: Answer =
        serde_json::from_str(body).map_err(|e| format!("not a Prometheus alerts answer ({e})"))?;
    if answer.status != "success" {
        return Err(format!(
            "Prometheus answered {}: {}",
            answer.status,
            answer.error.unwrap_or_default()
        ));
    }
    let mut names: Vec<String> = answer
        .data
        .map(|d| d.alerts)
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.state == "firing")
        .filter_map(|mut a| a.labels.remove("alertname"))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Whether `node`'s upgrade turn (or, with no node, the run's start) may begin at `now_ms`;
/// `pods` when the run has a blocking-pod selector (only a node's turn checks it). The window is
/// checked first, so a hold says until when whenever it can.
pub fn decide(
    window: &MaintenanceWindow,
    node: Option<&str>,
    pods: Option<PodCheck<'_>>,
    alerts: Alerts<'_>,
    now_ms: i64,
) -> Gate {
    if !window.is_open(now_ms) {
        let until = window.next_open(now_ms);
        return Gate::Hold(Hold {
            reason: HoldReason::MaintenanceWindow,
            until_ms: Some(until),
            node: node.map(str::to_string),
            blocking_pods: Vec::new(),
            firing_alerts: Vec::new(),
            message: format!(
                "waiting for maintenance window until {} (window {:?}); no new node turn starts outside it",
                window.rfc3339(until),
                window.source()
            ),
        });
    }
    let alert_hold = |firing: Vec<String>, message: String| {
        Gate::Hold(Hold {
            reason: HoldReason::PrometheusAlert,
            until_ms: None,
            node: node.map(str::to_string),
            blocking_pods: Vec::new(),
            firing_alerts: firing,
            message,
        })
    };
    match alerts {
        Alerts::NotGated | Alerts::Firing([]) => {}
        Alerts::NotAsked => {
            return alert_hold(
                Vec::new(),
                "waiting for Prometheus's first answer about firing alerts".into(),
            );
        }
        Alerts::Unreachable(e) => {
            return alert_hold(
                Vec::new(),
                format!("held: cannot ask Prometheus about firing alerts ({e}); asking again"),
            );
        }
        Alerts::Firing(names) => {
            return alert_hold(
                names.to_vec(),
                format!(
                    "held: Prometheus alert(s) firing: {}; no new node turn starts until they resolve",
                    names.join(", ")
                ),
            );
        }
    }
    let (Some(node), Some(check)) = (node, pods) else {
        return Gate::Open;
    };
    let Some(all) = check.pods else {
        return Gate::Hold(Hold {
            reason: HoldReason::BlockingPod,
            until_ms: None,
            node: Some(node.to_string()),
            blocking_pods: Vec::new(),
            firing_alerts: Vec::new(),
            message: format!(
                "waiting to list the pods matching blocking-pod selector {:?} before node {node} starts",
                check.selector
            ),
        });
    };
    let mut blocking: Vec<String> = all
        .iter()
        .filter(|p| p.blocks() && p.node.as_deref() == Some(node))
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    if blocking.is_empty() {
        return Gate::Open;
    }
    blocking.sort();
    Gate::Hold(Hold {
        reason: HoldReason::BlockingPod,
        until_ms: None,
        node: Some(node.to_string()),
        firing_alerts: Vec::new(),
        message: format!(
            "node {node} is held: pod(s) matching blocking-pod selector {:?} run there: {}; it starts once they are gone",
            check.selector,
            blocking.join(", ")
        ),
        blocking_pods: blocking,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, node: Option<&str>, phase: &str) -> BlockingPod {
        BlockingPod {
            namespace: ns.into(),
            name: name.into(),
            node: node.map(str::to_string),
            phase: phase.into(),
        }
    }

    fn utc(local: &str) -> i64 {
        let dt: jiff::civil::DateTime = local.parse().unwrap();
        dt.to_zoned(jiff::tz::TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_millisecond()
    }

    fn check<'a>(pods: Option<&'a [BlockingPod]>) -> Option<PodCheck<'a>> {
        Some(PodCheck {
            selector: "app=backup",
            pods,
        })
    }

    #[test]
    fn no_window_and_no_selector_is_open() {
        let always = MaintenanceWindow::parse("").unwrap();
        assert_eq!(decide(&always, None, None, Alerts::NotGated, 0), Gate::Open);
    }

    #[test]
    fn outside_the_window_holds_until_it_opens() {
        let win = MaintenanceWindow::parse("Mon-Fri 22:00-06:00").unwrap();
        let Gate::Hold(h) = decide(
            &win,
            None,
            None,
            Alerts::NotGated,
            utc("2026-11-30T12:00:00"),
        ) else {
            panic!("held");
        };
        assert_eq!(h.reason, HoldReason::MaintenanceWindow);
        assert_eq!(h.until_ms, Some(utc("2026-11-30T22:00:00")));
        assert!(
            h.message
                .contains("waiting for maintenance window until 2026-11-30T22:00:00+00:00"),
            "{}",
            h.message
        );
        assert_eq!(
            decide(
                &win,
                None,
                None,
                Alerts::NotGated,
                utc("2026-11-30T22:00:00")
            ),
            Gate::Open
        );
        // The window wins over pods: a hold that knows when it ends.
        let pods = [pod("ops", "backup", Some("n2"), "Running")];
        let Gate::Hold(h) = decide(
            &win,
            Some("n2"),
            check(Some(&pods)),
            Alerts::Firing(&["Firing".to_string()]),
            utc("2026-11-30T12:00:00"),
        ) else {
            panic!("held");
        };
        assert_eq!(h.reason, HoldReason::MaintenanceWindow);
        assert_eq!(h.node.as_deref(), Some("n2"));
        // The run's start (no node): the window only.
        let always = MaintenanceWindow::parse("").unwrap();
        assert_eq!(
            decide(&always, None, check(Some(&pods)), Alerts::NotGated, 0),
            Gate::Open
        );
    }

    #[test]
    fn only_running_or_pending_pods_on_the_candidate_node_block() {
        let always = MaintenanceWindow::parse("").unwrap();
        let pods = [
            pod("ops", "elsewhere", Some("n1"), "Running"),
            pod("ops", "done", Some("n2"), "Succeeded"),
            pod("ops", "broken", Some("n2"), "Failed"),
            pod("ops", "unscheduled", None, "Pending"),
        ];
        assert_eq!(
            decide(&always, Some("n2"), check(Some(&pods)), Alerts::NotGated, 0),
            Gate::Open
        );
        let mut more = pods.to_vec();
        more.push(pod("ops", "starting", Some("n2"), "Pending"));
        more.push(pod("db", "backup", Some("n2"), "Running"));
        let Gate::Hold(h) = decide(&always, Some("n2"), check(Some(&more)), Alerts::NotGated, 0)
        else {
            panic!("held");
        };
        assert_eq!(h.reason, HoldReason::BlockingPod);
        assert_eq!(h.until_ms, None);
        assert_eq!(h.blocking_pods, ["db/backup", "ops/starting"]);
        assert!(
            h.message.contains("db/backup, ops/starting"),
            "{}",
            h.message
        );
        assert!(h.message.contains("app=backup"), "{}", h.message);
    }

    #[test]
    fn firing_matching_alerts_hold_and_an_unreachable_prometheus_holds_too() {
        let always = MaintenanceWindow::parse("").unwrap();
        let firing = ["NodeDiskPressure".to_string()];
        for (alerts, needle) in [
            (Alerts::NotAsked, "first answer"),
            (
                Alerts::Unreachable("connection refused"),
                "connection refused",
            ),
            (Alerts::Firing(&firing), "NodeDiskPressure"),
        ] {
            let Gate::Hold(h) = decide(&always, Some("n2"), None, alerts, 0) else {
                panic!("held: {alerts:?}");
            };
            assert_eq!(h.reason, HoldReason::PrometheusAlert);
            assert!(h.message.contains(needle), "{}", h.message);
        }
        let Gate::Hold(h) = decide(&always, None, None, Alerts::Firing(&firing), 0) else {
            panic!("the run's start is held too");
        };
        assert_eq!(h.firing_alerts, firing);
        assert_eq!(
            decide(&always, Some("n2"), None, Alerts::Firing(&[]), 0),
            Gate::Open
        );
    }

    #[test]
    fn firing_alert_names_come_from_firing_alerts_only() {
        let body = r#"{"status":"success","data":{"alerts":[
            {"labels":{"alertname":"NodeDiskPressure","node":"n1"},"state":"firing"},
            {"labels":{"alertname":"NodeDiskPressure","node":"n2"},"state":"firing"},
            {"labels":{"alertname":"SlowBurn"},"state":"pending"},
            {"labels":{"alertname":"Watchdog"},"state":"firing"}]}}"#;
        assert_eq!(
            firing_alert_names(body).unwrap(),
            ["NodeDiskPressure", "Watchdog"]
        );
        let e = firing_alert_names(r#"{"status":"error","error":"bad query"}"#).unwrap_err();
        assert!(e.contains("bad query"), "{e}");
        assert!(firing_alert_names("<html>").is_err());
    }

    #[test]
    fn pods_not_listed_yet_hold_rather_than_guess() {
        let always = MaintenanceWindow::parse("").unwrap();
        let Gate::Hold(h) = decide(&always, Some("n2"), check(None), Alerts::NotGated, 0) else {
            panic!("held");
        };
        assert_eq!(h.reason, HoldReason::BlockingPod);
        assert!(h.blocking_pods.is_empty());
        assert!(h.message.contains("waiting to list"), "{}", h.message);
        assert_eq!(
            decide(&always, Some("n2"), check(Some(&[])), Alerts::NotGated, 0),
            Gate::Open
        );
    }
}
