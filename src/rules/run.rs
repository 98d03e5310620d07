//! A group snapshot's rules: pre actions in every matching place in parallel, a barrier,
//! the snapshot, background actions ended, post actions always. The freeze window (first
//! pre action start to last post action end) is measured; only the snapshot happens in it.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use super::exec::{Executor, Holding, Outcome, Target};
use super::{OnError, Rule, RuleItem};
use crate::k8s::labels::label_map;

/// Why work done inside the rules failed.
#[derive(Debug, thiserror::Error)]
pub enum Barrier {
    /// A pre action (the body did not run) or a post action failed.
    #[error("{0}")]
    Hook(String),
    /// The body itself (the snapshot) failed.
    #[error("{0:#}")]
    Body(anyhow::Error),
}

/// What the rules of one cycle did.
#[derive(Debug, Clone, Default)]
pub struct FreezeReport {
    pub freeze: Duration,
    /// Every action that failed (pre, background and post), for status and metrics.
    pub failures: Vec<Outcome>,
    /// Every action run, in completion order.
    pub outcomes: Vec<Outcome>,
}

/// The rules of a protection for one cycle, with where they run.
#[derive(Clone)]
pub struct Rules {
    pub executor: Executor,
    /// Kubernetes mode: the selection's pods (rules match their labels).
    pub pods: Vec<Value>,
    pub pre: Vec<Rule>,
    pub post: Vec<Rule>,
}

impl Rules {
    pub fn is_empty(&self) -> bool {
        self.pre.is_empty() && self.post.is_empty()
    }

    /// Where an item's actions run, and the matching pods that cannot run them now (not
    /// Running, or the container not ready), each with why.
    fn targets(&self, item: &RuleItem) -> (Vec<Target>, Vec<(Target, String)>) {
        if let Executor::Local = self.executor {
            return (vec![Target::Local], Vec::new());
        }
        let (mut ready, mut not) = (Vec::new(), Vec::new());
        for p in self.matching(item) {
            let container = item.container.clone().or_else(|| default_container(p));
            let t = Target::Pod {
                namespace: p["metadata"]["namespace"].as_str().unwrap_or("").into(),
                name: p["metadata"]["name"].as_str().unwrap_or("").into(),
                container: container.clone(),
            };
            match not_runnable(p, container.as_deref()) {
                None => ready.push(t),
                Some(why) => not.push((t, why)),
            }
        }
        (ready, not)
    }

    fn matching<'a>(&'a self, item: &'a RuleItem) -> impl Iterator<Item = &'a Value> + 'a {
        self.pods.iter().filter(|p| {
            let ns = p["metadata"]["namespace"].as_str().unwrap_or("");
            let name = p["metadata"]["name"].as_str().unwrap_or("");
            match (&item.pod, &item.selector) {
                (Some((pns, pname)), _) => pns == ns && pname == name,
                (None, Some(sel)) => sel.matches(&label_map(p.pointer("/metadata/labels"))),
                (None, None) => true,
            }
        })
    }

    /// Runs `rules` in order; each action runs in all its targets at once. Background
    /// actions are left holding in `held`. Returns the failure that stopped it (the first of
    /// an action whose onError is Fail), or None.
    async fn phase(
        &self,
        rules: &[Rule],
        held: &mut Vec<Holding>,
        report: &mut FreezeReport,
    ) -> Option<Outcome> {
        for rule in rules {
            for item in &rule.items {
                let (targets, unrunnable) = self.targets(item);
                for action in &item.actions {
                    let here: Vec<&Target> = if action.single_pod {
                        targets.iter().take(1).collect()
                    } else {
                        targets.iter().collect()
                    };
                    let mut failed = false;
                    let before = report.failures.len();
                    // A pod that cannot run it now is a failed action, handled by onError;
                    // a single-pod action needs only one pod that can.
                    if !action.single_pod || targets.is_empty() {
                        for (t, why) in &unrunnable {
                            let o = Outcome::not_run(&rule.name, t, action, why);
                            report.outcomes.push(o.clone());
                            report.failures.push(o);
                            failed |= action.on_error == OnError::Fail;
                        }
                    }
                    if action.background {
                        let starts = here
                            .iter()
                            .map(|t| self.executor.start(&rule.name, t, action));
                        for r in futures::future::join_all(starts).await {
                            match r {
                                Ok(h) => held.push(h),
                                Err(o) => {
                                    report.outcomes.push(o.clone());
                                    report.failures.push(o);
                                    failed |= action.on_error == OnError::Fail;
                                }
                            }
                        }
                    } else {
                        let runs = here
                            .iter()
                            .map(|t| self.executor.run(&rule.name, t, action));
                        for o in futures::future::join_all(runs).await {
                            if !o.ok() {
                                report.failures.push(o.clone());
                                failed |= action.on_error == OnError::Fail;
                            }
                            report.outcomes.push(o);
                        }
                    }
                    if failed {
                        // This action's failures all share its onError: the first stopped it.
                        return Some(report.failures[before].clone());
                    }
                }
            }
        }
        None
    }

    /// Runs the pre rules, then `body` if they all succeeded, then ends background actions
    /// and runs the post rules (always, once pre rules started).
    pub async fn around<T>(
        &self,
        body: impl std::future::Future<Output = Result<T>>,
        report: &mut FreezeReport,
    ) -> Result<T, Barrier> {
        let started = Instant::now();
        let mut held = Vec::new();
        let stopped = self.phase(&self.pre, &mut held, report).await;
        let value = if stopped.is_none() {
            Some(body.await)
        } else {
            None
        };
        for o in futures::future::join_all(held.into_iter().map(Holding::end)).await {
            if !o.ok() {
                report.failures.push(o.clone());
            }
            report.outcomes.push(o);
        }
        let before_post = report.failures.len();
        let mut none = Vec::new();
        self.phase(&self.post, &mut none, report).await;
        for h in none {
            report.outcomes.push(h.end().await);
        }
        report.freeze = started.elapsed();
        if let Some(f) = stopped {
            return Err(Barrier::Hook(format!(
                "pre {}; snapshot not taken",
                f.describe()
            )));
        }
        let value = value.expect("body ran").map_err(Barrier::Body)?;
        let post_failures: Vec<String> = report.failures[before_post..]
            .iter()
            .map(Outcome::describe)
            .collect();
        if !post_failures.is_empty() {
            return Err(Barrier::Hook(format!("post {}", post_failures.join("; "))));
        }
        Ok(value)
    }
}

/// The container an exec goes to when the rule names none: the pod's
/// `kubectl.kubernetes.io/default-container`, else its first container (what kubectl and
/// Velero do; a real server refuses an exec without one when a pod has several).
pub fn default_container(pod: &Value) -> Option<String> {
    pod.pointer("/metadata/annotations/kubectl.kubernetes.io~1default-container")
        .and_then(Value::as_str)
        .or_else(|| {
            pod.pointer("/spec/containers/0/name")
                .and_then(Value::as_str)
        })
        .map(String::from)
}

/// Why a pod cannot run an exec in `container` now, or None when it can.
pub fn not_runnable(pod: &Value, container: Option<&str>) -> Option<String> {
    let phase = pod["status"]["phase"].as_str().unwrap_or("Unknown");
    if phase != "Running" {
        return Some(format!("the pod is {phase}, not Running; not exec'd"));
    }
    let c = container?;
    let ready = pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == c)
        .is_some_and(|s| s["ready"] == true);
    (!ready).then(|| format!("container {c} is not ready; not exec'd"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{format, Action};

    fn local(pre: Vec<Rule>, post: Vec<Rule>) -> Rules {
        Rules {
            executor: Executor::Local,
            pods: vec![],
            pre,
            post,
        }
    }

    fn action(cmd: &str, background: bool, timeout_ms: u64) -> Action {
        Action {
            command: cmd.into(),
            argv: None,
            background,
            single_pod: false,
            timeout: Duration::from_millis(timeout_ms),
            on_error: OnError::Fail,
        }
    }

    fn rule(actions: Vec<Action>) -> Rule {
        Rule {
            name: "r".into(),
            items: vec![RuleItem {
                selector: None,
                pod: None,
                container: None,
                actions,
            }],
        }
    }

    #[tokio::test]
    async fn the_error_names_the_action_that_stopped_the_snapshot_not_an_earlier_continue() {
        let mut tolerated = action("exit 3", false, 5000);
        tolerated.on_error = OnError::Continue;
        let stopper = action("exit 4", false, 5000);
        let rules = local(vec![rule(vec![tolerated, stopper])], vec![]);
        let mut report = FreezeReport::default();
        let err = rules
            .around(async { Ok(()) }, &mut report)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`exit 4`") && !err.contains("`exit 3`"),
            "{err}"
        );
        assert_eq!(report.failures.len(), 2);
    }

    #[tokio::test]
    async fn a_held_action_dropped_with_its_cycle_still_runs_its_unlock_step() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let cmd = format!(
            "echo locked > {f}; ${{WAIT_CMD}}; echo released > {f}",
            f = state.display()
        );
        let held = Executor::Local
            .start("r", &Target::Local, &action(&cmd, true, 5000))
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(&state).unwrap().trim(), "locked");
        drop(held); // as when the cycle holding it is cancelled
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&state).unwrap().trim() != "released" {
            assert!(Instant::now() < deadline, "the holder was never released");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_failed_pre_action_skips_the_body_and_post_still_runs() {
        let dir = tempfile::tempdir().unwrap();
        let post = dir.path().join("post-ran");
        let rules = local(
            vec![format::local(
                "pre",
                &["echo broken >&2; exit 3".into()],
                Duration::from_secs(10),
            )],
            vec![format::local(
                "post",
                &[format!("touch {}", post.display())],
                Duration::from_secs(10),
            )],
        );
        let mut body_ran = false;
        let mut report = FreezeReport::default();
        let err = rules
            .around(
                async {
                    body_ran = true;
                    Ok(())
                },
                &mut report,
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(!body_ran);
        assert!(post.exists());
        assert!(
            err.contains("exited with 3") && err.contains("broken") && err.contains("this host"),
            "{err}"
        );
        assert_eq!(report.failures.len(), 1);
    }

    #[tokio::test]
    async fn a_background_action_holds_until_the_snapshot_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let l = log.display();
        // The lock holder writes "locked", waits, then writes "released" after the body.
        let rules = local(
            vec![rule(vec![action(
                &format!("echo locked >> {l}; ${{WAIT_CMD}}; echo released >> {l}"),
                true,
                10_000,
            )])],
            vec![],
        );
        let mut report = FreezeReport::default();
        let log2 = log.clone();
        rules
            .around(
                async move {
                    let seen = std::fs::read_to_string(&log2).unwrap();
                    assert_eq!(seen, "locked\n", "the body runs while the lock is held");
                    std::fs::write(log2.with_extension("snap"), "taken").unwrap();
                    Ok(())
                },
                &mut report,
            )
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "locked\nreleased\n");
        assert!(report.failures.is_empty(), "{:?}", report.failures);
    }

    #[tokio::test]
    async fn an_action_that_outlives_its_timeout_is_killed_and_reported() {
        let rules = local(vec![rule(vec![action("sleep 30", false, 200)])], vec![]);
        let mut report = FreezeReport::default();
        let err = rules
            .around(async { Ok(()) }, &mut report)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("outlived its timeout and was killed"), "{err}");
        assert!(report.failures[0].timed_out);
        // A background action that never reaches its lock is killed at its timeout too.
        let rules = local(
            vec![rule(vec![action("sleep 30; ${WAIT_CMD}", true, 200)])],
            vec![],
        );
        let mut report = FreezeReport::default();
        let err = rules
            .around(async { Ok(()) }, &mut report)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("outlived its timeout"), "{err}");
    }

    #[tokio::test]
    async fn on_error_continue_lets_the_snapshot_go_ahead() {
        let mut a = action("exit 1", false, 5_000);
        a.on_error = OnError::Continue;
        let rules = local(vec![rule(vec![a])], vec![]);
        let mut report = FreezeReport::default();
        rules.around(async { Ok(()) }, &mut report).await.unwrap();
        assert_eq!(report.failures.len(), 1);
    }
}
