//! What a cycle covers: the group of volumes, the rules that hold them quiet, and (in
//! Kubernetes mode) the manifest bundle that commits with the gen. Local mode: the
//! configured volumes and commands. Kubernetes mode: the selection's PVCs read just before
//! the snapshot, the Stork Rules and Velero hooks of its pods, and the sanitised objects.

use crate::api::KubeStatus;
use crate::config::Protection;
use crate::ids::{Gen, VolumeName};
use crate::replicate::error::CycleError;
use crate::rules::exec::Executor;
use crate::rules::run::Rules;
use crate::site::primary::Primary;

pub struct Selected {
    /// The protection with this cycle's volumes.
    pub group: Protection,
    pub rules: Rules,
    /// Kubernetes mode: the encoded manifest bundle of the gen.
    pub bundle: Option<Vec<u8>>,
    /// Kubernetes mode: each volume's PVC at the primary, (namespace, PVC, volume).
    pub pvcs: Vec<(String, String, String)>,
}

pub async fn select(
    primary: &Primary,
    prot: &Protection,
    gen: Gen,
) -> Result<Selected, CycleError> {
    let local = Rules {
        executor: Executor::Local,
        pods: Vec::new(),
        pre: prot.pre_rules.clone(),
        post: prot.post_rules.clone(),
    };
    let Some(kp) = &prot.kubernetes else {
        return Ok(Selected {
            group: prot.clone(),
            rules: local,
            bundle: None,
            pvcs: Vec::new(),
        });
    };
    let name = prot.name.as_str();
    primary
        .live
        .activity(name, format!("gen {gen}: collecting manifests"));
    let client = primary.kube(name).map_err(CycleError::Kubernetes)?;
    let collected = crate::k8s::collect::collect(client, kp)
        .await
        .map_err(CycleError::Kubernetes)?;
    let mut group = prot.clone();
    for v in &collected.volumes {
        let vname =
            VolumeName::new(&v.name).map_err(|e| CycleError::Kubernetes(anyhow::anyhow!(e)))?;
        if group.volume(&v.name).is_none() {
            group.volumes.push(crate::config::Volume {
                name: vname,
                path: v.path.clone(),
            });
        }
    }
    let rules = kube_rules(client, prot, kp, collected.pods.clone())
        .await
        .map_err(CycleError::Kubernetes)?;
    let b = &collected.bundle;
    primary.live.update(name, |l| {
        l.kubernetes = Some(KubeStatus {
            gen: Some(gen.0),
            covers: b.coverage.clone(),
            warnings: b.warnings.clone(),
            ..Default::default()
        })
    });
    Ok(Selected {
        group,
        rules,
        bundle: Some(b.encode()),
        pvcs: collected
            .volumes
            .iter()
            .map(|v| (v.namespace.clone(), v.pvc.clone(), v.name.clone()))
            .collect(),
    })
}

/// Kubernetes mode: the protection's rules run in its pods: Stork Rule files, the Stork
/// Rule objects named in `[protection.kubernetes]`, and the pods' Velero hook annotations.
async fn kube_rules(
    client: &kube::Client,
    prot: &Protection,
    kp: &crate::k8s::KubeProtection,
    pods: Vec<serde_json::Value>,
) -> anyhow::Result<Rules> {
    use crate::rules::format;
    let mut pre = prot.pre_rules.clone();
    let mut post = prot.post_rules.clone();
    let ns = kp
        .namespaces
        .first()
        .map(String::as_str)
        .unwrap_or("default");
    let kind = crate::k8s::kinds::Kind {
        group: "stork.libopenstorage.org".into(),
        version: "v1alpha1".into(),
        kind: "Rule".into(),
        plural: "rules".into(),
        namespaced: true,
    };
    for (name, list) in [(&kp.pre_rule, &mut pre), (&kp.post_rule, &mut post)] {
        let Some(name) = name else { continue };
        let api: kube::Api<kube::api::DynamicObject> =
            kube::Api::namespaced_with(client.clone(), ns, &kind.resource());
        let obj = api
            .get(name)
            .await
            .map_err(|e| crate::k8s::api_error(e, format!("get Stork Rule {ns}/{name}")))?;
        let mut v = serde_json::to_value(obj)?;
        v["apiVersion"] = kind.api_version().into();
        v["kind"] = "Rule".into();
        list.push(format::stork_rule_object(&v, prot.hook_timeout)?);
    }
    if kp.velero_hooks {
        for (phase, list) in [("pre", &mut pre), ("post", &mut post)] {
            let items = pods
                .iter()
                .map(|p| format::velero_hooks(p, phase))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let items: Vec<_> = items.into_iter().flatten().collect();
            if !items.is_empty() {
                list.push(crate::rules::Rule {
                    name: format!("velero {phase}-backup hooks"),
                    items,
                });
            }
        }
    }
    Ok(Rules {
        executor: Executor::Kube(client.clone()),
        pods,
        pre,
        post,
    })
}
