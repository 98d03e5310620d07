//! Where a CSI driver offers changed block tracking: its `SnapshotMetadataService`
//! (`cbt.storage.k8s.io`, cluster-scoped, named after the driver), whose address, audience
//! and CA the movers need to call the SnapshotMetadata API. The daemon looks it up once per
//! driver per cycle; the movers make the calls (the answers can be long and stay on the
//! nodes).

use std::collections::BTreeMap;

use anyhow::Result;
use serde_json::Value;

use super::api_error;
use super::kinds::Kind;
use super::objects::api;

pub const CBT_GROUP: &str = "cbt.storage.k8s.io";
/// Served versions, newest first.
const VERSIONS: [&str; 2] = ["v1beta1", "v1alpha1"];

/// A driver's SnapshotMetadata service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// HOST:PORT.
    pub address: String,
    /// The audience the ServiceAccount token must be scoped to.
    pub audience: String,
    /// The CA bundle, base64 of PEM, as the object stores it.
    pub ca_cert: String,
}

pub fn kind(version: &str) -> Kind {
    Kind::new(
        CBT_GROUP,
        version,
        "SnapshotMetadataService",
        "snapshotmetadataservices",
        false,
    )
}

/// Reads a SnapshotMetadataService object; `Err` names the field that is missing.
pub fn parse(v: &Value) -> Result<Service, String> {
    let field = |f: &str| {
        v["spec"][f]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| format!("spec.{f} is missing"))
    };
    Ok(Service {
        address: field("address")?,
        audience: field("audience")?,
        ca_cert: field("caCert")?,
    })
}

/// The services of `drivers` that exist. A driver without one (or a cluster without the
/// API) is simply absent; a refused lookup or a malformed object is logged and absent too,
/// since movers then scan everything, which is always correct.
pub async fn discover(client: &kube::Client, drivers: &[String]) -> BTreeMap<String, Service> {
    let mut out = BTreeMap::new();
    for driver in drivers.iter().map(String::as_str) {
        if out.contains_key(driver) {
            continue;
        }
        match lookup(client, driver).await {
            Ok(Some(s)) => {
                out.insert(driver.to_string(), s);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(
                driver,
                "changed block tracking not used: {e:#}; movers read whole volumes"
            ),
        }
    }
    out
}

async fn lookup(client: &kube::Client, driver: &str) -> Result<Option<Service>> {
    for v in VERSIONS {
        match api(client, &kind(v), None).get(driver).await {
            Ok(o) => {
                let value = serde_json::to_value(o)?;
                return parse(&value).map(Some).map_err(|e| {
                    anyhow::anyhow!("SnapshotMetadataService {driver} ({CBT_GROUP}/{v}): {e}")
                });
            }
            Err(kube::Error::Api(s)) if s.code == 404 => continue,
            Err(e) => {
                return Err(api_error(
                    e,
                    format!("get SnapshotMetadataService {driver} ({CBT_GROUP}/{v})"),
                ))
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_object_is_read_or_its_missing_field_named() {
        let v = serde_json::json!({"spec": {"address": "sms.csi:6443", "audience": "rbd-cbt", "caCert": "Q0E="}});
        assert_eq!(
            parse(&v).unwrap(),
            Service {
                address: "sms.csi:6443".into(),
                audience: "rbd-cbt".into(),
                ca_cert: "Q0E=".into()
            }
        );
        let v = serde_json::json!({"spec": {"address": "sms.csi:6443", "caCert": "Q0E="}});
        assert_eq!(parse(&v).unwrap_err(), "spec.audience is missing");
    }
}
