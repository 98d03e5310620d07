//! Failover as a pure plan: from the protection's record, its committed but unapplied gens
//! and (Kubernetes) the recovered gen's objects, the steps a failover takes and what each
//! changes. `failover --dry-run` prints this plan; the real run executes these same steps
//! in order and times each one.

use serde_json::Value;

use crate::api::KubeFailover;
use crate::ids::{Epoch, Gen, Point};
use crate::k8s::bundle::describe;
use crate::k8s::{REPLICAS_ANNOTATION, SUSPEND_ANNOTATION};
use crate::store::{CommitRecord, ProtectionRecord};

/// One step of a failover.
#[derive(Debug, Clone, PartialEq)]
pub enum Planned {
    /// Finish the committed gens not yet applied to the replicas and drop uncommitted
    /// staging: the replicas sit at the consistent point.
    Confirm { pending: usize },
    /// Raise the epoch so the old primary is refused (already raised: nothing changes).
    Fence { from: Epoch, to: Epoch },
    /// File replicas: put each replica back to an older recovery point's clone.
    Restore { gen: Gen, volumes: usize },
    /// Apply the gen's manifests in the active form.
    Apply {
        gen: Gen,
        objects: usize,
        scaled: Vec<String>,
        resumed: Vec<String>,
    },
    /// Wait until every workload reports its ready replicas.
    WaitReady,
}

impl Planned {
    pub fn describe(&self) -> String {
        match self {
            Planned::Confirm { pending: 0 } => {
                "confirm the consistent point (drop uncommitted staging)".into()
            }
            Planned::Confirm { pending } => format!(
                "confirm the consistent point: finish {pending} committed gen(s) not yet applied to the replicas, drop uncommitted staging"
            ),
            Planned::Fence { from, to } if from == to => {
                format!("the old primary is fenced already (epoch {to})")
            }
            Planned::Fence { from, to } => format!("fence the old primary (epoch {from} -> {to})"),
            Planned::Restore { gen, volumes } => format!(
                "put the {volumes} replica(s) back to recovery point {gen} (reflink clones of its files)"
            ),
            Planned::Apply {
                gen,
                objects,
                scaled,
                resumed,
            } => {
                let mut s = format!("apply the manifests of gen {gen} ({objects} objects)");
                if !scaled.is_empty() {
                    s += &format!("; scale {}", scaled.join(", "));
                }
                if !resumed.is_empty() {
                    s += &format!("; resume {}", resumed.join(", "));
                }
                s
            }
            Planned::WaitReady => "wait until the workloads report ready replicas".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FailoverPlan {
    /// The epoch once fenced.
    pub epoch: Epoch,
    pub already_failed_over: bool,
    /// The point the replicas will be at: the newest committed gen.
    pub point: Option<Point>,
    pub steps: Vec<Planned>,
    pub kubernetes: Option<KubeFailover>,
}

/// Why there is no plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protection {0} has no consistent point: nothing to fail over to")]
pub struct NothingToRecover(pub String);

/// What a failover of `name` does. `objects`: Kubernetes mode, the recovered gen's
/// objects in the active form (None in local mode).
pub fn plan(
    name: &str,
    rec: &ProtectionRecord,
    pending: &[CommitRecord],
    objects: Option<&[Value]>,
    chosen: Option<Point>,
) -> Result<FailoverPlan, NothingToRecover> {
    let newest = pending
        .last()
        .map(|c| c.point.point)
        .or(rec.point.as_ref().map(|p| p.point));
    // An older retained recovery point, where one was asked for (CSI replicas).
    let point = chosen.or(newest);
    let already = rec.failed_over.is_some();
    let epoch = if already {
        rec.epoch
    } else {
        Epoch(rec.epoch.0 + 1)
    };
    let mut steps = vec![
        Planned::Confirm {
            pending: pending.len(),
        },
        Planned::Fence {
            from: rec.epoch,
            to: epoch,
        },
    ];
    // An older point of file replicas: its clones replace the replicas (CSI points are
    // restored into PVCs by the apply instead).
    if let Some(pt) = chosen.filter(|c| Some(c.gen) != newest.map(|n| n.gen)) {
        if let Some(p) = rec.recovery_point(pt.gen).filter(|p| !p.files.is_empty()) {
            steps.push(Planned::Restore {
                gen: pt.gen,
                volumes: p.files.len(),
            });
        }
    }
    let kubernetes = match (objects, point) {
        (Some(objs), Some(pt)) => {
            let k = active_form(objs, pt.gen);
            steps.push(Planned::Apply {
                gen: pt.gen,
                objects: k.applied.len(),
                scaled: k.scaled.clone(),
                resumed: k.resumed.clone(),
            });
            steps.push(Planned::WaitReady);
            Some(k)
        }
        (Some(_), None) => return Err(NothingToRecover(name.to_string())),
        (None, _) => None,
    };
    Ok(FailoverPlan {
        epoch,
        already_failed_over: already,
        point,
        steps,
        kubernetes,
    })
}

/// What the active form changes: every object applied, the workloads scaled to the
/// primary's counts, the CronJobs resumed.
fn active_form(objs: &[Value], gen: Gen) -> KubeFailover {
    let mut k = KubeFailover {
        gen: gen.0,
        ..Default::default()
    };
    for o in objs {
        k.applied.push(describe(o));
        if let Some(n) = o["metadata"]["annotations"][REPLICAS_ANNOTATION].as_str() {
            k.scaled.push(format!("{} to {n}", describe(o)));
        }
        if o["metadata"]["annotations"][SUSPEND_ANNOTATION] == "false" {
            k.resumed.push(describe(o));
        }
    }
    k
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::ids::CycleId;
    use crate::store::records::FailoverRecord;
    use crate::store::PointRecord;

    fn pr(gen: u64) -> PointRecord {
        PointRecord {
            point: Point {
                gen: Gen(gen),
                cycle: CycleId(gen),
                taken_at_ms: gen,
            },
            volumes: BTreeMap::new(),
        }
    }

    fn commit(gen: u64) -> CommitRecord {
        CommitRecord {
            v: 1,
            point: pr(gen),
            logs: BTreeMap::new(),
            fresh: Default::default(),
            repaired: Default::default(),
        }
    }

    #[test]
    fn plan_table() {
        let objs = vec![
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"namespace": "prod", "name": "db", "annotations": {REPLICAS_ANNOTATION: "3"}}}),
            json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"namespace": "prod", "name": "backup", "annotations": {SUSPEND_ANNOTATION: "false"}}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "prod", "name": "db"}}),
        ];
        let at = |gen: Option<u64>| ProtectionRecord {
            point: gen.map(pr),
            ..Default::default()
        };
        let failed = ProtectionRecord {
            epoch: Epoch(2),
            failed_over: Some(FailoverRecord {
                at_ms: 1,
                gen: Some(Gen(4)),
                snapshot_taken_at_ms: Some(4),
            }),
            ..at(Some(4))
        };
        // (record, pending commits, objects) -> (epoch after, point gen, step texts)
        struct Row<'a> {
            rec: ProtectionRecord,
            pending: Vec<CommitRecord>,
            objects: Option<&'a [Value]>,
            epoch: u64,
            gen: Option<u64>,
            steps: Vec<&'a str>,
        }
        let rows = [
            Row {
                rec: at(Some(4)),
                pending: vec![],
                objects: None,
                epoch: 2,
                gen: Some(4),
                steps: vec![
                    "confirm the consistent point (drop uncommitted staging)",
                    "fence the old primary (epoch 1 -> 2)",
                ],
            },
            // A commit not yet applied is what the replicas will hold.
            Row {
                rec: at(Some(4)),
                pending: vec![commit(5)],
                objects: Some(&objs),
                epoch: 2,
                gen: Some(5),
                steps: vec![
                    "confirm the consistent point: finish 1 committed gen(s) not yet applied to the replicas, drop uncommitted staging",
                    "fence the old primary (epoch 1 -> 2)",
                    "apply the manifests of gen 5 (3 objects); scale StatefulSet prod/db to 3; resume CronJob prod/backup",
                    "wait until the workloads report ready replicas",
                ],
            },
            // A second failover changes no epoch.
            Row {
                rec: failed,
                pending: vec![],
                objects: None,
                epoch: 2,
                gen: Some(4),
                steps: vec![
                    "confirm the consistent point (drop uncommitted staging)",
                    "the old primary is fenced already (epoch 2)",
                ],
            },
            // Local mode with nothing replicated yet: fencing still stops the primary.
            Row {
                rec: at(None),
                pending: vec![],
                objects: None,
                epoch: 2,
                gen: None,
                steps: vec![
                    "confirm the consistent point (drop uncommitted staging)",
                    "fence the old primary (epoch 1 -> 2)",
                ],
            },
        ];
        for row in rows {
            let p = plan("p", &row.rec, &row.pending, row.objects, None).unwrap();
            let texts: Vec<String> = p.steps.iter().map(Planned::describe).collect();
            assert_eq!(texts, row.steps);
            assert_eq!(p.epoch, Epoch(row.epoch));
            assert_eq!(p.point.map(|p| p.gen.0), row.gen);
        }
        // Kubernetes mode with no consistent point has nothing to apply.
        assert_eq!(
            plan("p", &at(None), &[], Some(&objs), None),
            Err(NothingToRecover("p".into()))
        );
    }

    #[test]
    fn an_older_point_of_file_replicas_is_restored_before_the_fence_ends() {
        let file_point = |gen: u64| crate::store::RecoveryPoint {
            point: pr(gen),
            snapshots: BTreeMap::new(),
            held: false,
            drill: None,
            files: [(
                crate::ids::VolumeName::new("v1").unwrap(),
                std::path::PathBuf::from(format!("/r/.lifeboat-points/p/{gen}/v1.img")),
            )]
            .into(),
        };
        let rec = ProtectionRecord {
            point: Some(pr(4)),
            points: vec![file_point(2), file_point(3), file_point(4)],
            ..Default::default()
        };
        let texts = |chosen: u64| {
            let p = plan("p", &rec, &[], None, Some(pr(chosen).point)).unwrap();
            assert_eq!(p.point.map(|p| p.gen), Some(Gen(chosen)));
            p.steps.iter().map(Planned::describe).collect::<Vec<_>>()
        };
        assert_eq!(
            texts(2).last().unwrap(),
            "put the 1 replica(s) back to recovery point 2 (reflink clones of its files)"
        );
        // The newest point is the replicas themselves: nothing to put back.
        assert!(!texts(4).iter().any(|t| t.starts_with("put")));
    }
}
