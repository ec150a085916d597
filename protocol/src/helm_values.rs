//! `helm-set-values`: extra `key=value` pairs a run passes to its `helm upgrade`, each as its own
//! `--set` argv entry (never through a shell, never joined into one `--set`).
//!
//! Entries are separated by newlines or `;` (a comma cannot separate them: helm's own `--set`
//! syntax uses commas inside lists, `shims.x.supportedArches={amd64,arm64}`). The keys that
//! node-by-node pacing depends on are refused, whatever their spelling, so a run can never undo
//! its own `OnDelete`, turn kata-deploy's cluster-wide verification back on, or widen job mode's
//! node list.
use std::fmt;

/// Keys (and everything below them) a run controls itself.
const RESERVED: &[(&str, &str)] = &[
    (
        "updateStrategy",
        "the run sets updateStrategy.type=OnDelete so that no kata-deploy pod moves until its node's turn",
    ),
    (
        "verification.pod",
        "kata-deploy's own verification is cluster-wide; the run turns it off and verifies each node itself",
    ),
    (
        "job.nodes",
        "in job mode the run names the nodes of each turn itself",
    ),
    (
        "deploymentMode",
        "switching kata-deploy between daemonset and job mode is a migration, not an upgrade",
    ),
];

/// One `--set key=value` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetValue {
    pub key: String,
    pub value: String,
}

impl SetValue {
    /// The argv entry after `--set`.
    pub fn to_arg(&self) -> String {
        format!("{}={}", self.key, self.value)
    }
}

impl fmt::Display for SetValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_arg())
    }
}

/// Parses the annotation (or chart default). Empty input is no extra values.
pub fn parse(text: &str) -> Result<Vec<SetValue>, String> {
    let mut out = Vec::new();
    for entry in text.split(['\n', ';']).map(str::trim) {
        if entry.is_empty() {
            continue;
        }
        let Some((key, value)) = entry.split_once('=') else {
            return Err(format!(
                "{entry:?} is not key=value (separate entries with newlines or ';')"
            ));
        };
        let key = key.trim();
        check_key(key).map_err(|why| format!("{entry:?}: {why}"))?;
        out.push(SetValue {
            key: key.to_string(),
            value: value.to_string(),
        });
    }
    Ok(out)
}

fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("empty key".into());
    }
    // helm's --set path syntax: names, dots, list indexes, escaped dots.
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '[' | ']' | '\\')))
    {
        return Err(format!("character {c:?} is not allowed in a value path"));
    }
    // `updateStrategy.type`, `updateStrategy`, `verification.pod[0]`, `job.nodes[1]`: compare
    // the dotted path with list indexes and escapes removed.
    let normalized: String = key
        .split('.')
        .map(|part| {
            part.split('[')
                .next()
                .unwrap_or(part)
                .trim_end_matches('\\')
        })
        .collect::<Vec<_>>()
        .join(".");
    for (reserved, why) in RESERVED {
        if normalized == *reserved || normalized.starts_with(&format!("{reserved}.")) {
            return Err(format!("{reserved} cannot be set per run: {why}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_become_separate_set_arguments() {
        let v = parse(
            "image.reference=registry.example/kata-deploy\n shims.disableAll=true ;debug=true",
        )
        .unwrap();
        let args: Vec<String> = v.iter().map(SetValue::to_arg).collect();
        assert_eq!(
            args,
            [
                "image.reference=registry.example/kata-deploy",
                "shims.disableAll=true",
                "debug=true"
            ]
        );
    }

    #[test]
    fn a_value_keeps_its_commas_and_equals_signs() {
        let v = parse("shims.qemu.supportedArches={amd64,arm64}\nenv.extra=a=b").unwrap();
        assert_eq!(v[0].value, "{amd64,arm64}");
        assert_eq!(v[1].key, "env.extra");
        assert_eq!(v[1].value, "a=b");
    }

    #[test]
    fn empty_input_is_no_values() {
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse(" ;\n ; ").unwrap(), vec![]);
    }

    #[test]
    fn what_pacing_depends_on_is_refused_with_the_reason() {
        for key in [
            "updateStrategy.type",
            "updateStrategy",
            "updateStrategy.rollingUpdate.maxUnavailable",
            "verification.pod",
            "job.nodes",
            "job.nodes[0]",
            "deploymentMode",
        ] {
            let err = parse(&format!("{key}=x")).unwrap_err();
            assert!(err.contains("cannot be set per run"), "{key}: {err}");
        }
        // Neighbours of reserved keys are fine.
        assert!(parse("verification.timeout=600\njob.parallelism=2\nupdateStrategyX=1").is_ok());
    }

    #[test]
    fn malformed_entries_are_refused() {
        assert!(parse("debug").unwrap_err().contains("not key=value"));
        assert!(parse("=true").unwrap_err().contains("empty key"));
        assert!(parse("a b=c").unwrap_err().contains("not allowed"));
        assert!(parse("$(reboot)=1").unwrap_err().contains("not allowed"));
    }
}
