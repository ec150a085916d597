//! `kubectl get nodes -L <label> -L <label>`, printed the way kubectl prints it. There is no
//! kubectl binary on the demo machine, so the demo reads the Nodes itself and formats them with
//! kubectl's rules: columns NAME, STATUS, ROLES, AGE, VERSION, then one column per `-L` label
//! headed by the upper-cased last segment of its key, aligned like Go's tabwriter
//! (min width 6, padding 3).

use k8s_openapi::api::core::v1::Node;

pub fn get_nodes(nodes: &[Node], label_columns: &[&str], now: i64) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header: Vec<String> = ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    header.extend(
        label_columns
            .iter()
            .map(|l| l.rsplit('/').next().unwrap_or(l).to_uppercase()),
    );
    rows.push(header);
    for n in nodes {
        let labels = n.metadata.labels.clone().unwrap_or_default();
        let mut row = vec![
            n.metadata.name.clone().unwrap_or_default(),
            status(n),
            roles(&labels),
            n.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| human_duration((now - t.0.as_millisecond()) / 1000))
                .unwrap_or_else(|| "<unknown>".into()),
            n.status
                .as_ref()
                .and_then(|s| s.node_info.as_ref())
                .map(|i| i.kubelet_version.clone())
                .unwrap_or_default(),
        ];
        row.extend(
            label_columns
                .iter()
                .map(|l| labels.get(*l).cloned().unwrap_or_default()),
        );
        rows.push(row);
    }
    tabwrite(&rows)
}

fn status(n: &Node) -> String {
    let ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| match c.status.as_str() {
            "True" => "Ready",
            "False" => "NotReady",
            _ => "Unknown",
        })
        .unwrap_or("Unknown");
    if n.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
    {
        format!("{ready},SchedulingDisabled")
    } else {
        ready.to_owned()
    }
}

fn roles(labels: &std::collections::BTreeMap<String, String>) -> String {
    let mut roles: Vec<String> = labels
        .iter()
        .filter_map(|(k, v)| {
            if let Some(r) = k.strip_prefix("node-role.kubernetes.io/") {
                Some(r.to_owned())
            } else if k == "kubernetes.io/role" {
                Some(v.clone())
            } else {
                None
            }
        })
        .filter(|r| !r.is_empty())
        .collect();
    roles.sort();
    roles.dedup();
    if roles.is_empty() {
        "<none>".into()
    } else {
        roles.join(",")
    }
}

/// k8s.io/apimachinery's `duration.HumanDuration`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let secs = secs.max(0);
    if secs < 60 * 2 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let d = (hours / 24) % 365;
        return if d == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{d}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

/// Go's `tabwriter.NewWriter(out, 6, 4, 3, ' ', …)` as kubectl uses it: every cell but the
/// last of a line is padded to its column's width (longest cell + 3, at least 6).
fn tabwrite(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate().take(r.len().saturating_sub(1)) {
            widths[i] = widths[i].max((c.chars().count() + 3).max(6));
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_match_kubectl() {
        for (s, want) in [
            (0, "0s"),
            (59, "59s"),
            (119, "119s"),
            (120, "2m"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 60, "3h1m"),
            (9 * 3600, "9h"),
            (50 * 3600, "2d2h"),
        ] {
            assert_eq!(human_duration(s), want, "{s}s");
        }
    }

    #[test]
    fn columns_align_like_tabwriter() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "worker-1", "labels": {"a/kata-status": "completed"},
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "nodeInfo": {"kubeletVersion": "kwok-v0.8.0", "architecture": "", "bootID": "",
                                    "containerRuntimeVersion": "", "kernelVersion": "", "kubeProxyVersion": "",
                                    "machineID": "", "operatingSystem": "", "osImage": "", "systemUUID": ""}}
        }))
        .unwrap();
        let now = jiff_like_ms("2026-01-01T00:00:42Z");
        let out = get_nodes(&[node], &["a/kata-status", "b/version"], now);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "NAME       STATUS                     ROLES    AGE   VERSION       KATA-STATUS   VERSION"
        );
        assert_eq!(
            lines[1],
            "worker-1   Ready,SchedulingDisabled   <none>   42s   kwok-v0.8.0   completed"
        );
    }

    fn jiff_like_ms(ts: &str) -> i64 {
        let t: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time =
            serde_json::from_value(serde_json::json!(ts)).unwrap();
        t.0.as_millisecond()
    }
}
