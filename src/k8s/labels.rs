//! Label selectors in the string form kubectl and the API accept (`app=cassandra,tier!=web,
//! env in (prod,dr),!legacy`): parsed once, matched against label maps, and written back
//! for list calls.

use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    terms: Vec<Term>,
}

fn check_key(k: &str, whole: &str) -> Result<String, String> {
    let k = k.trim();
    let ok = !k.is_empty()
        && k.len() <= 316
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
    if ok {
        Ok(k.to_string())
    } else {
        Err(format!(
            "{whole:?} is not a label selector: {k:?} is not a label key; expected e.g. \"app=cassandra\" or \"env in (prod,dr)\""
        ))
    }
}

fn check_value(v: &str, whole: &str) -> Result<String, String> {
    let v = v.trim();
    let ok = v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!(
            "{whole:?} is not a label selector: {v:?} is not a label value"
        ))
    }
}

/// Splits at commas that are not inside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

impl Selector {
    /// A selector that matches everything.
    pub fn everything() -> Selector {
        Selector::default()
    }

    pub fn parse(s: &str) -> Result<Selector, String> {
        let mut terms = Vec::new();
        if s.trim().is_empty() {
            return Ok(Selector { terms });
        }
        for raw in split_terms(s) {
            let t = raw.trim();
            let term = if let Some(k) = t.strip_prefix('!') {
                Term::Absent(check_key(k, s)?)
            } else if let Some((k, v)) = t.split_once("!=") {
                Term::Ne(check_key(k, s)?, check_value(v, s)?)
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                Term::Eq(check_key(k, s)?, check_value(v, s)?)
            } else if let Some((k, rest)) = t
                .split_once(" notin ")
                .map(|(k, r)| (k, (r, false)))
                .or_else(|| t.split_once(" in ").map(|(k, r)| (k, (r, true))))
            {
                let (list, is_in) = rest;
                let inner = list
                    .trim()
                    .strip_prefix('(')
                    .and_then(|l| l.strip_suffix(')'))
                    .ok_or_else(|| {
                        format!("{s:?} is not a label selector: {t:?} needs a list in parentheses, e.g. \"env in (prod,dr)\"")
                    })?;
                let values = inner
                    .split(',')
                    .map(|v| check_value(v, s))
                    .collect::<Result<Vec<_>, _>>()?;
                let key = check_key(k, s)?;
                if is_in {
                    Term::In(key, values)
                } else {
                    Term::NotIn(key, values)
                }
            } else {
                Term::Exists(check_key(t, s)?)
            };
            terms.push(term);
        }
        Ok(Selector { terms })
    }

    /// From a `LabelSelector` object (`matchLabels` and `matchExpressions`), as Services,
    /// PDBs, NetworkPolicies and Velero conditions carry them.
    pub fn from_object(v: &serde_json::Value) -> Result<Selector, String> {
        let mut terms = Vec::new();
        if let Some(m) = v.get("matchLabels").and_then(|m| m.as_object()) {
            for (k, val) in m {
                terms.push(Term::Eq(k.clone(), val.as_str().unwrap_or("").to_string()));
            }
        }
        if let Some(exprs) = v.get("matchExpressions").and_then(|e| e.as_array()) {
            for e in exprs {
                let key = e["key"].as_str().unwrap_or("").to_string();
                let values: Vec<String> = e["values"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                terms.push(match e["operator"].as_str() {
                    Some("In") => Term::In(key, values),
                    Some("NotIn") => Term::NotIn(key, values),
                    Some("Exists") => Term::Exists(key),
                    Some("DoesNotExist") => Term::Absent(key),
                    other => return Err(format!("unknown selector operator {other:?}")),
                });
            }
        }
        Ok(Selector { terms })
    }

    /// A Service-style selector: a plain map, every pair must match. An empty map selects
    /// nothing for a Service, so callers check emptiness themselves.
    pub fn from_map(m: &serde_json::Map<String, serde_json::Value>) -> Selector {
        Selector {
            terms: m
                .iter()
                .map(|(k, v)| Term::Eq(k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::Ne(k, v) => labels.get(k) != Some(v),
            Term::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Term::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Term::Exists(k) => labels.contains_key(k),
            Term::Absent(k) => !labels.contains_key(k),
        })
    }

    /// Matches the `labels` map of a JSON object (absent means no labels).
    pub fn matches_json(&self, labels: Option<&serde_json::Value>) -> bool {
        self.matches(&label_map(labels))
    }
}

/// A JSON labels object as a map (non-string values are skipped).
pub fn label_map(labels: Option<&serde_json::Value>) -> BTreeMap<String, String> {
    labels
        .and_then(|l| l.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .terms
            .iter()
            .map(|t| match t {
                Term::Eq(k, v) => format!("{k}={v}"),
                Term::Ne(k, v) => format!("{k}!={v}"),
                Term::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                Term::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                Term::Exists(k) => k.clone(),
                Term::Absent(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
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
    fn every_operator_matches_as_kubectl_does() {
        let l = labels(&[("app", "cassandra"), ("env", "prod")]);
        for (sel, want) in [
            ("app=cassandra", true),
            ("app==cassandra", true),
            ("app=mysql", false),
            ("app!=mysql", true),
            ("env in (prod,dr)", true),
            ("env notin (prod)", false),
            ("tier notin (web)", true),
            ("app", true),
            ("!app", false),
            ("!tier", true),
            ("app=cassandra,env in (dr)", false),
            ("", true),
        ] {
            let s = Selector::parse(sel).unwrap();
            assert_eq!(s.matches(&l), want, "{sel}");
            assert_eq!(
                Selector::parse(&s.to_string()).unwrap(),
                s,
                "{sel} round trip"
            );
        }
    }

    #[test]
    fn bad_selectors_name_the_bad_part() {
        for (sel, part) in [
            ("app=cas sandra", "cas sandra"),
            ("env in prod", "needs a list"),
            ("=x", "not a label key"),
        ] {
            let e = Selector::parse(sel).unwrap_err();
            assert!(e.contains(part), "{sel}: {e}");
        }
    }

    #[test]
    fn label_selector_objects_match_like_the_string_form() {
        let v = serde_json::json!({"matchLabels": {"app": "cassandra"},
            "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]});
        let s = Selector::from_object(&v).unwrap();
        assert!(s.matches(&labels(&[("app", "cassandra"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "cassandra")])));
    }
}
