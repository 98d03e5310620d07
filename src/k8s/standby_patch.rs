//! Standby patches: what keeps a custom resource's operator (or another controller) from
//! starting the application at the DR site while lifeboat still writes its replicas.
//! Workloads sit at zero replicas by themselves ([`super::bundle::dr_objects`]); an
//! operator's custom resource would be reconciled as soon as it exists, so its standby
//! form is the object with a JSON merge patch applied (a `paused` field, a
//! pause-reconciliation annotation). Failover applies the object as the primary has it:
//! the server-side apply drops what the patch added and restores what it changed.
//!
//! Defaults, for operators users run on Kubernetes (a config entry for the same kind
//! replaces the default):
//! - KEDA `ScaledObject`: `autoscaling.keda.sh/paused-replicas: "0"`;
//! - CloudNativePG `Cluster`: `cnpg.io/hibernation: "on"`;
//! - K8ssandra / cass-operator `CassandraDatacenter`: `spec.stopped: true`;
//! - Strimzi `Kafka`: `strimzi.io/pause-reconciliation: "true"`;
//! - Percona XtraDB Cluster and Percona Server for MongoDB: `spec.pause: true`;
//! - Flux `Kustomization` and `HelmRelease`: `spec.suspend: true`.

use serde_json::{json, Value};

/// Marks an object applied in its standby-patched form.
pub const PATCHED_ANNOTATION: &str = "lifeboat.dev/standby-patched";

/// A kind, as `Kind.group` or `plural.group`, and its merge patch.
#[derive(Debug, Clone, PartialEq)]
pub struct StandbyPatch {
    pub kind: String,
    pub patch: Value,
}

/// The built-in patches (see the module's list).
pub fn defaults() -> Vec<StandbyPatch> {
    let annotate = |k: &str, v: &str| json!({"metadata": {"annotations": {k: v}}});
    let spec = |k: &str| json!({"spec": {k: true}});
    [
        (
            "ScaledObject.keda.sh",
            annotate("autoscaling.keda.sh/paused-replicas", "0"),
        ),
        (
            "Cluster.postgresql.cnpg.io",
            annotate("cnpg.io/hibernation", "on"),
        ),
        (
            "CassandraDatacenter.cassandra.datastax.com",
            spec("stopped"),
        ),
        (
            "Kafka.kafka.strimzi.io",
            annotate("strimzi.io/pause-reconciliation", "true"),
        ),
        ("PerconaXtraDBCluster.pxc.percona.com", spec("pause")),
        ("PerconaServerMongoDB.psmdb.percona.com", spec("pause")),
        ("Kustomization.kustomize.toolkit.fluxcd.io", spec("suspend")),
        ("HelmRelease.helm.toolkit.fluxcd.io", spec("suspend")),
    ]
    .into_iter()
    .map(|(kind, patch)| StandbyPatch {
        kind: kind.into(),
        patch,
    })
    .collect()
}

/// The patch for an object of `kind` (with its `plural`) in `group`: the config's, else a
/// default. Names compare without case.
pub fn find<'a>(
    configured: &'a [StandbyPatch],
    defaults: &'a [StandbyPatch],
    kind: &str,
    plural: &str,
    group: &str,
) -> Option<&'a StandbyPatch> {
    let is = |p: &&StandbyPatch| {
        [kind, plural]
            .iter()
            .any(|n| p.kind.eq_ignore_ascii_case(&format!("{n}.{group}")))
    };
    configured
        .iter()
        .find(is)
        .or_else(|| defaults.iter().find(is))
}

/// RFC 7386 merge of `patch` into `v`, and the mark that it was applied.
pub fn apply(v: &mut Value, patch: &StandbyPatch) {
    json_patch::merge(v, &patch.patch);
    v["metadata"]["annotations"][PATCHED_ANNOTATION] = json!(patch.kind);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_patch_replaces_the_default_and_names_match_by_kind_or_plural() {
        let mine = vec![StandbyPatch {
            kind: "cassandradatacenters.cassandra.datastax.com".into(),
            patch: json!({"spec": {"stopped": true, "size": null}}),
        }];
        let d = defaults();
        let p = find(
            &mine,
            &d,
            "CassandraDatacenter",
            "cassandradatacenters",
            "cassandra.datastax.com",
        )
        .unwrap();
        assert_eq!(p.patch["spec"]["size"], Value::Null);
        let keda = find(&[], &d, "ScaledObject", "scaledobjects", "keda.sh").unwrap();
        let mut so = json!({"metadata": {"name": "s"}, "spec": {"minReplicaCount": 1}});
        apply(&mut so, keda);
        assert_eq!(
            so["metadata"]["annotations"]["autoscaling.keda.sh/paused-replicas"],
            "0"
        );
        assert_eq!(
            so["metadata"]["annotations"][PATCHED_ANNOTATION],
            "ScaledObject.keda.sh"
        );
        assert!(find(&[], &d, "Widget", "widgets", "example.com").is_none());
        let mut dc = json!({"spec": {"size": 3, "stopped": false}});
        apply(&mut dc, p);
        assert_eq!(dc["spec"], json!({"stopped": true}));
    }
}
