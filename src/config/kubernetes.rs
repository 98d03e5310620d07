//! Validation of the Kubernetes tables: `[kubernetes]` (how this site's daemon reaches its
//! cluster) and each protection's `[protection.kubernetes]` selection.

use std::path::Path;

use super::raw::{RawKubeProtection, RawKubernetes};
use super::validate::Validator;
use super::Role;
use crate::k8s::{KubeProtection, KubeSettings};

impl Validator {
    /// The CSI data path's settings (`snapshot_*`, `[protection.kubernetes.mover]`).
    fn csi_settings(&mut self, key: &str, k: &RawKubeProtection) -> crate::k8s::CsiSettings {
        use crate::k8s::{CsiSettings, MoverSettings};
        let d = MoverSettings::default();
        let m = k.mover.as_ref();
        let mut duration = |field: String, s: Option<&String>, default: std::time::Duration| match s
        {
            Some(s) => super::validate::parse_duration(s).unwrap_or_else(|e| {
                self.problem(field, e);
                default
            }),
            None => default,
        };
        let snapshot_timeout = duration(
            format!("{key}.snapshot_timeout"),
            k.snapshot_timeout.as_ref(),
            std::time::Duration::from_secs(300),
        );
        let stuck_after = duration(
            format!("{key}.mover.stuck_after"),
            m.and_then(|m| m.stuck_after.as_ref()),
            d.stuck_after,
        );
        let concurrency = m.and_then(|m| m.concurrency).unwrap_or(d.concurrency);
        if concurrency == 0 {
            self.problem(
                format!("{key}.mover.concurrency"),
                "is 0; expected how many movers of the protection may run at once, e.g. 4",
            );
        }
        let cbt_sample = m.and_then(|m| m.cbt_sample).unwrap_or(d.cbt_sample);
        if !(0.0..=1.0).contains(&cbt_sample) {
            self.problem(
                format!("{key}.mover.cbt_sample"),
                format!("is {cbt_sample}; expected the share of the chunks a changed block answer leaves out that are read anyway, from 0 to 1, e.g. 0.01"),
            );
        }
        let pick = |v: Option<&String>, d: &String| v.cloned().unwrap_or_else(|| d.clone());
        CsiSettings {
            wanted: crate::k8s::snapshot::Wanted {
                snapshot_class: k.snapshot_class.clone(),
                group_snapshot_class: k.group_snapshot_class.clone(),
                group_snapshots: k.group_snapshots.unwrap_or(true),
            },
            snapshot_timeout,
            mover: MoverSettings {
                image: pick(m.and_then(|m| m.image.as_ref()), &d.image),
                namespace: pick(m.and_then(|m| m.namespace.as_ref()), &d.namespace),
                concurrency: concurrency.max(1),
                cpu: pick(m.and_then(|m| m.cpu.as_ref()), &d.cpu),
                memory: pick(m.and_then(|m| m.memory.as_ref()), &d.memory),
                cpu_limit: m.and_then(|m| m.cpu_limit.clone()).or(d.cpu_limit),
                memory_limit: pick(m.and_then(|m| m.memory_limit.as_ref()), &d.memory_limit),
                tls_secret: pick(m.and_then(|m| m.tls_secret.as_ref()), &d.tls_secret),
                stuck_after,
                connect: m.and_then(|m| m.connect.clone()),
                cbt: m.and_then(|m| m.cbt).unwrap_or(d.cbt),
                cbt_sample: cbt_sample.clamp(0.0, 1.0),
                service_account: pick(
                    m.and_then(|m| m.service_account.as_ref()),
                    &d.service_account,
                ),
            },
        }
    }

    /// `[kubernetes]`, or the defaults (in-cluster service account or `$KUBECONFIG`) when
    /// it is missing but some protection is a Kubernetes protection.
    pub(super) fn kube_settings(
        &mut self,
        raw: Option<&RawKubernetes>,
        any_kube_protection: bool,
    ) -> Option<KubeSettings> {
        match (raw, any_kube_protection) {
            (Some(k), _) => {
                if k.max_movers == Some(0) {
                    self.problem(
                        "kubernetes.max_movers",
                        "is 0; expected how many movers this site may run at once, e.g. 8",
                    );
                }
                Some(KubeSettings {
                    kubeconfig: k
                        .kubeconfig
                        .as_deref()
                        .map(|s| self.path("kubernetes.kubeconfig", s)),
                    context: k.context.clone(),
                    max_movers: k.max_movers.filter(|n| *n > 0),
                })
            }
            (None, true) => Some(KubeSettings::default()),
            (None, false) => None,
        }
    }

    pub(super) fn kube_protection(
        &mut self,
        key: &str,
        k: RawKubeProtection,
        role: Role,
    ) -> KubeProtection {
        use crate::k8s::labels::Selector;
        let dns_label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if role == Role::Primary && k.namespaces.is_empty() {
            self.problem(
                format!("{key}.namespaces"),
                "is empty; expected the namespace(s) to protect, e.g. [\"prod\"]",
            );
        }
        for (i, ns) in k.namespaces.iter().enumerate() {
            if !dns_label(ns) {
                self.problem(
                    format!("{key}.namespaces[{i}]"),
                    format!("{ns:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"),
                );
            }
        }
        for (from, to) in &k.namespace_map {
            if !dns_label(to) {
                self.problem(
                    format!("{key}.namespace_map.{from}"),
                    format!("{to:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"),
                );
            }
        }
        let drill_namespace = k
            .drill_namespace
            .clone()
            .unwrap_or_else(|| crate::k8s::DEFAULT_DRILL_NAMESPACE.to_string());
        let targets: Vec<&str> = k
            .namespaces
            .iter()
            .map(|ns| k.namespace_map.get(ns).map_or(ns.as_str(), String::as_str))
            .collect();
        let mut drills = std::collections::BTreeSet::new();
        for t in &targets {
            let d = drill_namespace.replace("{namespace}", t);
            if !dns_label(&d) {
                self.problem(
                    format!("{key}.drill_namespace"),
                    format!("{drill_namespace:?} makes {d:?} for namespace {t:?}, which is not a namespace name (lowercase letters, digits and '-', at most 63); expected e.g. \"{{namespace}}-drill\""),
                );
            } else if targets.contains(&d.as_str()) {
                self.problem(
                    format!("{key}.drill_namespace"),
                    format!("{drill_namespace:?} makes {d:?}, a protected namespace itself; a drill needs a namespace of its own"),
                );
            } else if !drills.insert(d.clone()) {
                self.problem(
                    format!("{key}.drill_namespace"),
                    format!("{drill_namespace:?} makes {d:?} for two namespaces; expected a template with {{namespace}}"),
                );
            }
        }
        let selector = k
            .selector
            .as_deref()
            .and_then(|s| match Selector::parse(s) {
                Ok(sel) => Some(sel),
                Err(e) => {
                    self.problem(format!("{key}.selector"), e);
                    None
                }
            });
        let resource_modifiers = k.resource_modifiers.as_deref().and_then(|s| {
            let path = self.path(&format!("{key}.resource_modifiers"), s);
            match crate::k8s::transform::Modifiers::load(&path) {
                Ok(m) => Some(m),
                Err(e) => {
                    self.problem(format!("{key}.resource_modifiers"), format!("{e:#}"));
                    None
                }
            }
        });
        // No volume_path: the CSI data path (snapshots and mover Jobs at the primary,
        // replica PVCs, writer Jobs and recovery-point snapshots at the DR site).
        let volume_path = match k.volume_path.as_deref() {
            Some(t) if t.contains("{pvc}") => Some(t.to_string()),
            Some(t) => {
                self.problem(
                    format!("{key}.volume_path"),
                    format!("{t:?} does not contain {{pvc}}; expected a template such as \"/srv/volumes/{{namespace}}/{{pvc}}.img\""),
                );
                None
            }
            None => None,
        };
        let csi = k.volume_path.is_none().then(|| self.csi_settings(key, &k));
        if let (Some(n), true) = (&k.volume_node, csi.is_some() || role != Role::Dr) {
            self.problem(
                format!("{key}.volume_node"),
                format!("{n:?} is set, but only a DR site with volume_path (host-path replicas) uses it; remove it, or set volume_path"),
            );
        }
        if let (Some(c), Role::Dr) = (&csi, role) {
            if let Some(a) = &c.mover.connect {
                if !a.contains(':') {
                    self.problem(
                        format!("{key}.mover.connect"),
                        format!("{a:?} is not HOST:PORT; expected where the DR site's writer Jobs reach this daemon, e.g. \"lifeboat.lifeboat.svc:7420\""),
                    );
                }
            }
        }
        let volume_path = volume_path.map(|t| {
            if Path::new(&t).is_absolute() {
                t
            } else {
                self.base.join(t).display().to_string()
            }
        });
        let mut standby_patches = Vec::new();
        for (i, p) in k.standby_patches.iter().enumerate() {
            let pkey = format!("{key}.standby_patch[{i}]");
            if !p.kind.contains('.') {
                self.problem(
                    format!("{pkey}.kind"),
                    format!("{:?} has no API group; expected Kind.group or plural.group, such as \"CassandraDatacenter.cassandra.datastax.com\"", p.kind),
                );
            }
            match serde_json::from_str::<serde_json::Value>(&p.patch) {
                Ok(v) if v.is_object() => standby_patches.push(crate::k8s::standby_patch::StandbyPatch {
                    kind: p.kind.clone(),
                    patch: v,
                }),
                Ok(_) => self.problem(format!("{pkey}.patch"), "is not a JSON object; expected a JSON merge patch such as '{\"spec\": {\"paused\": true}}'"),
                Err(e) => self.problem(format!("{pkey}.patch"), format!("is not JSON ({e}); expected a JSON merge patch such as '{{\"spec\": {{\"paused\": true}}}}'")),
            }
        }
        KubeProtection {
            csi,
            standby_patches,
            namespaces: k.namespaces,
            selector,
            include_kinds: k.include_kinds,
            exclude_kinds: k.exclude_kinds,
            custom_resources: k.custom_resources,
            exclude_label: k
                .exclude_label
                .unwrap_or_else(|| crate::k8s::EXCLUDE_LABEL.to_string()),
            namespace_map: k.namespace_map,
            drill_namespace,
            storage_class_map: k.storage_class_map,
            resource_modifiers,
            volume_path: volume_path.unwrap_or_default(),
            volume_node: k.volume_node,
            pre_rule: k.pre_rule,
            post_rule: k.post_rule,
            velero_hooks: k.velero_hooks.unwrap_or(true),
        }
    }
}
