//! Kubernetes label-selector syntax (equality- and set-based), parsed strictly so a bad
//! `node-selector` is rejected before anything is touched, and matched locally so the plan
//! is computed from one consistent list of Nodes.
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
    source: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "bad node selector {selector:?}: {reason}; write it like key=value,other-key!=x,k in (a,b)"
)]
pub struct SelectorError {
    pub selector: String,
    pub reason: String,
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let err = |reason: String| SelectorError {
            selector: text.to_string(),
            reason,
        };
        let mut requirements = Vec::new();
        for part in split_top_level(text).map_err(&err)? {
            let part = part.trim();
            if part.is_empty() {
                return Err(err("empty requirement".into()));
            }
            requirements.push(parse_requirement(part).map_err(&err)?);
        }
        Ok(LabelSelector {
            requirements,
            source: text.trim().to_string(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Splits on commas that are not inside `( … )`.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced ')'".into());
                }
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(valid_key(key.trim())?));
    }
    for (op, ctor) in [
        (
            " notin ",
            Requirement::NotIn as fn(String, Vec<String>) -> Requirement,
        ),
        (" in ", Requirement::In),
    ] {
        if let Some((key, set)) = part.split_once(op) {
            let set = set.trim();
            let inner = set
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(|| format!("set of {:?} must be in parentheses", key.trim()))?;
            let values = inner
                .split(',')
                .map(|v| valid_value(v.trim()))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(ctor(valid_key(key.trim())?, values));
        }
    }
    for (op, not) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((key, value)) = part.split_once(op) {
            let (k, v) = (valid_key(key.trim())?, valid_value(value.trim())?);
            return Ok(if not {
                Requirement::NotEquals(k, v)
            } else {
                Requirement::Equals(k, v)
            });
        }
    }
    Ok(Requirement::Exists(valid_key(part)?))
}

/// A qualified label key: optional DNS-subdomain prefix and a name of ≤63 chars.
pub fn valid_key(key: &str) -> Result<String, String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && (p.is_empty()
            || p.len() > 253
            || !p.split('.').all(|l| !l.is_empty() && is_dns_label_chars(l)))
    {
        return Err(format!("label key prefix {p:?} is not a DNS subdomain"));
    }
    if name.is_empty() || name.len() > 63 || !is_label_name(name) {
        return Err(format!("label key {key:?} is not a valid label key"));
    }
    Ok(key.to_string())
}

/// A label value: empty, or ≤63 alphanumerics with `-_.` inside.
pub fn valid_value(value: &str) -> Result<String, String> {
    if value.is_empty() || (value.len() <= 63 && is_label_name(value)) {
        Ok(value.to_string())
    } else {
        Err(format!("label value {value:?} is not valid"))
    }
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_dns_label_chars(l: &str) -> bool {
    let b = l.as_bytes();
    b.len() <= 63
        && b.first()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.last()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn matching_table() {
        let l = labels(&[
            ("katacontainers.io/kata-lifecycle-manager-window", "true"),
            ("node-pool", "kata-pool"),
        ]);
        let cases = [
            ("katacontainers.io/kata-lifecycle-manager-window=true", true),
            (
                "katacontainers.io/kata-lifecycle-manager-window==true",
                true,
            ),
            (
                "node-pool=kata-pool,katacontainers.io/kata-lifecycle-manager-window=true",
                true,
            ),
            ("node-pool!=kata-pool", false),
            ("node-pool in (a, kata-pool)", true),
            ("node-pool notin (a,kata-pool)", false),
            ("zone notin (a)", true),
            ("node-pool", true),
            ("!node-pool", false),
            ("!zone", true),
            ("zone=a", false),
            ("", true),
        ];
        for (sel, want) in cases {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&l),
                want,
                "{sel}"
            );
        }
    }

    #[test]
    fn rejects_bad_syntax() {
        for bad in [
            "=x",
            "a=b=c",
            "a in b",
            "a in (b",
            "a,,b",
            "-a=b",
            "a=-b-",
            "Bad_Prefix/x=y",
            "a in (b))",
            "key with space=1",
        ] {
            assert!(
                LabelSelector::parse(bad).is_err(),
                "{bad:?} must be rejected"
            );
        }
    }
}
