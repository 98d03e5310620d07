//! Reading rules: Stork's `Rule` objects (YAML files or objects read from the cluster) and
//! Velero's backup hook annotations on pods.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use super::{Action, OnError, Rule, RuleItem};
use crate::k8s::labels::Selector;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StorkRule {
    api_version: String,
    kind: String,
    metadata: StorkMeta,
    /// Stork's CRD has `rules`; the seed document's example (an older form) has `spec`.
    #[serde(alias = "spec")]
    rules: Vec<StorkItem>,
}

#[derive(Deserialize)]
struct StorkMeta {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StorkItem {
    #[serde(default)]
    pod_selector: BTreeMap<String, String>,
    /// lifeboat: the container to run in (Stork runs in the pod's first container).
    container: Option<String>,
    actions: Vec<StorkAction>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StorkAction {
    #[serde(rename = "type")]
    kind: String,
    value: String,
    #[serde(default)]
    background: bool,
    #[serde(default)]
    run_in_single_pod: bool,
    /// lifeboat: e.g. "30s" (default: the protection's hook_timeout).
    timeout: Option<String>,
    /// lifeboat: "Fail" (default) or "Continue", as Velero spells them.
    on_error: Option<String>,
}

fn on_error(s: Option<&str>, what: &str) -> Result<OnError> {
    match s {
        None | Some("Fail") => Ok(OnError::Fail),
        Some("Continue") => Ok(OnError::Continue),
        Some(other) => bail!("{what}: on-error {other:?}; expected \"Fail\" or \"Continue\""),
    }
}

fn timeout(s: Option<&str>, default: Duration, what: &str) -> Result<Duration> {
    match s {
        None => Ok(default),
        Some(t) => humantime::parse_duration(t.trim())
            .with_context(|| format!("{what}: timeout {t:?} is not a duration such as \"30s\"")),
    }
}

/// A Stork `Rule` in YAML. `default_timeout` applies to actions without a timeout.
pub fn stork_rule(yaml: &str, default_timeout: Duration) -> Result<Rule> {
    let r: StorkRule = serde_saphyr::from_str(yaml).context("not a Stork Rule")?;
    stork(r, default_timeout)
}

/// A Stork `Rule` read from the cluster as JSON.
pub fn stork_rule_object(v: &Value, default_timeout: Duration) -> Result<Rule> {
    let r: StorkRule = serde_json::from_value(v.clone()).context("not a Stork Rule")?;
    stork(r, default_timeout)
}

fn stork(r: StorkRule, default_timeout: Duration) -> Result<Rule> {
    if r.api_version != "stork.libopenstorage.org/v1alpha1" || r.kind != "Rule" {
        bail!(
            "{}/{}: expected apiVersion stork.libopenstorage.org/v1alpha1 and kind Rule",
            r.api_version,
            r.kind
        );
    }
    let name = r.metadata.name;
    let mut items = Vec::new();
    for (i, it) in r.rules.into_iter().enumerate() {
        let mut actions = Vec::new();
        for (j, a) in it.actions.into_iter().enumerate() {
            let what = format!("rule {name} item {i} action {j}");
            if a.kind != "command" {
                bail!("{what}: type {:?}; only \"command\" actions exist", a.kind);
            }
            actions.push(Action {
                command: a.value,
                argv: None,
                background: a.background,
                single_pod: a.run_in_single_pod,
                timeout: timeout(a.timeout.as_deref(), default_timeout, &what)?,
                on_error: on_error(a.on_error.as_deref(), &what)?,
            });
        }
        let selector = Selector::parse(
            &it.pod_selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        )
        .map_err(anyhow::Error::msg)?;
        items.push(RuleItem {
            selector: Some(selector),
            pod: None,
            container: it.container,
            actions,
        });
    }
    Ok(Rule { name, items })
}

/// Velero's hooks on one pod: `{phase}.hook.backup.velero.io/{container,command,on-error,
/// timeout}` with phase `pre` or `post`. The command is a JSON array (argv) or a plain
/// string. Velero's default timeout is 30s and its default on-error is Fail.
pub fn velero_hooks(pod: &Value, phase: &str) -> Result<Option<RuleItem>> {
    let ann = &pod["metadata"]["annotations"];
    let get = |k: &str| ann[format!("{phase}.hook.backup.velero.io/{k}")].as_str();
    let Some(command) = get("command") else {
        return Ok(None);
    };
    let ns = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
    let what = format!("pod {ns}/{name} {phase}.hook.backup.velero.io");
    let argv: Vec<String> = match serde_json::from_str::<Vec<String>>(command) {
        Ok(a) if !a.is_empty() => a,
        _ => vec![command.to_string()],
    };
    Ok(Some(RuleItem {
        selector: None,
        pod: Some((ns, name)),
        container: get("container").map(String::from),
        actions: vec![Action {
            command: argv.join(" "),
            argv: Some(argv),
            background: false,
            single_pod: false,
            timeout: timeout(get("timeout"), Duration::from_secs(30), &what)?,
            on_error: on_error(get("on-error"), &what)?,
        }],
    }))
}

/// Local mode: plain commands (the config's `pre` / `post` lists) as one rule.
pub fn local(name: &str, commands: &[String], default_timeout: Duration) -> Rule {
    Rule {
        name: name.to_string(),
        items: vec![RuleItem {
            selector: None,
            pod: None,
            container: None,
            actions: commands
                .iter()
                .map(|c| Action {
                    command: c.clone(),
                    argv: None,
                    background: false,
                    single_pod: false,
                    timeout: default_timeout,
                    on_error: OnError::Fail,
                })
                .collect(),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed document's example, verbatim (also shipped as a deployable rule).
    const SEED: &str = include_str!("../../deploy/rules/cassandra-presnap-rule.yaml");

    #[test]
    fn the_seed_documents_rule_loads_unchanged() {
        let r = stork_rule(SEED, Duration::from_secs(60)).unwrap();
        assert_eq!(r.name, "cassandra-presnap-rule");
        assert_eq!(r.items.len(), 1);
        let sel = r.items[0].selector.as_ref().unwrap();
        assert_eq!(sel.to_string(), "app=cassandra");
        let a = &r.items[0].actions[0];
        assert_eq!(a.command, "nodetool flush");
        assert!(!a.background && !a.single_pod);
        assert_eq!(a.on_error, OnError::Fail);
    }

    #[test]
    fn storks_current_form_with_background_and_single_pod_loads() {
        let y = format!(
            "{}    timeout: 45s\n    onError: Continue\n",
            include_str!("../../deploy/rules/mysql-lock.yaml")
        );
        let y = y.as_str();
        let r = stork_rule(y, Duration::from_secs(60)).unwrap();
        let a = &r.items[0].actions[0];
        assert!(a.background && a.single_pod);
        assert_eq!(a.timeout, Duration::from_secs(45));
        assert_eq!(a.on_error, OnError::Continue);
        let bad = y.replace("type: command", "type: snapshot");
        assert!(stork_rule(&bad, Duration::from_secs(1))
            .unwrap_err()
            .to_string()
            .contains("only \"command\""));
    }

    #[test]
    fn velero_annotations_become_one_action_in_their_pod() {
        let pod = serde_json::json!({"metadata": {"name": "db-0", "namespace": "prod", "annotations": {
            "pre.hook.backup.velero.io/container": "mysql",
            "pre.hook.backup.velero.io/command": "[\"/bin/sh\", \"-c\", \"mysql -e 'FLUSH TABLES'\"]",
            "pre.hook.backup.velero.io/on-error": "Continue",
            "pre.hook.backup.velero.io/timeout": "2m",
            "post.hook.backup.velero.io/command": "[\"/bin/true\"]"}}});
        let pre = velero_hooks(&pod, "pre").unwrap().unwrap();
        assert_eq!(pre.pod, Some(("prod".into(), "db-0".into())));
        assert_eq!(pre.container.as_deref(), Some("mysql"));
        let a = &pre.actions[0];
        assert_eq!(
            a.argv.as_ref().unwrap(),
            &vec![
                "/bin/sh".to_string(),
                "-c".into(),
                "mysql -e 'FLUSH TABLES'".into()
            ]
        );
        assert_eq!(a.on_error, OnError::Continue);
        assert_eq!(a.timeout, Duration::from_secs(120));
        let post = velero_hooks(&pod, "post").unwrap().unwrap();
        assert_eq!(post.actions[0].timeout, Duration::from_secs(30));
        assert!(post.container.is_none());
        let bad = serde_json::json!({"metadata": {"name": "x", "annotations": {
            "pre.hook.backup.velero.io/command": "true", "pre.hook.backup.velero.io/on-error": "Ignore"}}});
        assert!(velero_hooks(&bad, "pre")
            .unwrap_err()
            .to_string()
            .contains("Ignore"));
    }
}
