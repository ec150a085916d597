//! Which nodes a run upgrades, in which order. Pure: the caller lists the Nodes once.
use crate::params::RunParams;
use std::cmp::Ordering;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeFacts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
}

/// Selected nodes in deterministic "natural" name order (node-2 before node-10), so the
/// same fleet always upgrades in the same, predictable order.
pub fn select(nodes: &[NodeFacts], params: &RunParams) -> Vec<String> {
    let selector = params.selector();
    let mut names: Vec<String> = nodes
        .iter()
        .filter(|n| selector.matches(&n.labels))
        .filter(|n| {
            params.node_taint_key.is_empty()
                || n.taints.iter().any(|t| {
                    t.key == params.node_taint_key
                        && (params.node_taint_value.is_empty()
                            || t.value == params.node_taint_value)
                })
        })
        .map(|n| n.name.clone())
        .collect();
    names.sort_by(|a, b| natural_cmp(a, b));
    names.dedup();
    names
}

/// Compares strings treating runs of digits as numbers.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return a.cmp(b),
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(c), Some(d)) if c.is_ascii_digit() && d.is_ascii_digit() => {
                let nx = x.iter().take_while(|c| c.is_ascii_digit()).count();
                let ny = y.iter().take_while(|c| c.is_ascii_digit()).count();
                let (dx, dy) = (trim_zeros(&x[..nx]), trim_zeros(&y[..ny]));
                let ord = dx.len().cmp(&dy.len()).then_with(|| dx.cmp(dy));
                if ord != Ordering::Equal {
                    return ord;
                }
                x = &x[nx..];
                y = &y[ny..];
            }
            (Some(c), Some(d)) => {
                if c != d {
                    return c.cmp(d);
                }
                x = &x[1..];
                y = &y[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|c| **c == b'0').count();
    &d[n.min(d.len().saturating_sub(1))..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::node::DEFAULT_SELECTOR;

    fn params(selector: &str, key: &str, value: &str) -> RunParams {
        RunParams {
            target_version: "3.28.0".into(),
            helm_release: "kata-deploy".into(),
            helm_namespace: "kube-system".into(),
            node_selector: selector.into(),
            node_taint_key: key.into(),
            node_taint_value: value.into(),
            verification_namespace: "default".into(),
            verification_pod: String::new(),
            drain_enabled: false,
            drain_timeout_seconds: 300,
            verification_timeout_seconds: 300,
            helm_set_values: Vec::new(),
            drain_chosen: false,
            deployment_mode: Default::default(),
        }
    }

    fn node(name: &str, labels: &[(&str, &str)], taints: &[(&str, &str)]) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            taints: taints
                .iter()
                .map(|(k, v)| Taint {
                    key: k.to_string(),
                    value: v.to_string(),
                    effect: "NoSchedule".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn selection_table() {
        let w = ("katacontainers.io/kata-lifecycle-manager-window", "true");
        let pool = ("node-pool", "kata-pool");
        let t = ("kata-lifecycle-manager", "pending");
        let nodes = vec![
            node("node-10", &[w], &[]),
            node("node-2", &[w, pool], &[t]),
            node("node-1", &[pool], &[t]),
            node("node-3", &[], &[("kata-lifecycle-manager", "done")]),
            node("node-4", &[], &[]),
        ];
        let cases = [
            (params(DEFAULT_SELECTOR, "", ""), vec!["node-2", "node-10"]),
            (
                params("", "kata-lifecycle-manager", "pending"),
                vec!["node-1", "node-2"],
            ),
            (
                params("", "kata-lifecycle-manager", ""),
                vec!["node-1", "node-2", "node-3"],
            ),
            (
                params("node-pool=kata-pool", "kata-lifecycle-manager", ""),
                vec!["node-1", "node-2"],
            ),
            (
                params(
                    "node-pool=kata-pool,katacontainers.io/kata-lifecycle-manager-window=true",
                    "",
                    "",
                ),
                vec!["node-2"],
            ),
            (params("zone=mars", "", ""), vec![]),
        ];
        for (p, want) in cases {
            assert_eq!(select(&nodes, &p), want, "{p:?}");
        }
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["n10", "n2", "n1", "m", "n02", "n1a"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["m", "n1", "n1a", "n02", "n2", "n10"]);
    }
}
