//! Re-protect after a failover, in the original direction: the DR site takes replication
//! from the old primary again and the old primary lifts its fence. What the DR site's
//! replicas took since the failover (the application's writes there) is not kept by this:
//! the first cycles find those replicas changed outside lifeboat and resync them from the
//! primary by hash exchange. To keep the DR site's writes, fail back instead.
//!
//! Run it at both sites (through the daemon, or on the state store with the daemon down):
//! at the DR site it removes the fences beside the replicas and the failover record; at
//! the primary it lifts the fence, and the primary's next cycle takes the DR site's
//! (raised) epoch once.

use anyhow::{Context, Result};

use crate::config::Role;
use crate::replicate::receive::check;
use crate::site::dr::Dr;
use crate::site::Shared;
use crate::volume::fence;

/// Re-protect restores the configured direction; after a failback the direction is the
/// turn's, and the way back is `failover --planned` (the relocate), which keeps writes.
fn turned_around(rec: &crate::store::ProtectionRecord, name: &str) -> Result<()> {
    if let Some(t) = &rec.turn {
        anyhow::bail!(
            "protection {name} was failed back (this site {} {} since); re-protect works in the configured direction only: run `lifeboat failover --planned` at the site that should run the application",
            if t.sends { "sends to" } else { "receives from" },
            t.peer
        );
    }
    Ok(())
}

/// The DR site's half: returns what it did.
pub async fn dr(dr: &Dr, name: &str) -> Result<Vec<String>> {
    let prot = dr.protection(name)?.clone();
    let lock = dr.lock_of(name).expect("a lock per protection");
    let locked = lock.lock().await;
    let rec = dr.store.record(&prot.name).await?;
    turned_around(&rec, name)?;
    let group = check::group(&prot, &rec);
    let mut done = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
        let mut done = Vec::new();
        for v in &group.volumes {
            if fence::remove(&v.path)? {
                done.push(format!(
                    "removed the fence beside replica {}",
                    v.path.display()
                ));
            }
        }
        Ok(done)
    })
    .await
    .context("remove fences")??;
    let rec = dr.store.step(&prot.name, |s, p| s.reprotect(p)).await?;
    lock.end_failover(&locked);
    done.push(format!(
        "replication from the primary is taken again at epoch {}",
        rec.epoch
    ));
    tracing::warn!(protection = name, epoch = %rec.epoch, "re-protected: replication from the primary is taken again");
    Ok(done)
}

/// The primary's half: returns what it did.
pub async fn primary(shared: &Shared, name: &str) -> Result<Vec<String>> {
    debug_assert_eq!(shared.config.role, Role::Primary);
    let prot = shared.protection(name)?.clone();
    let before = shared.store.record(&prot.name).await?;
    turned_around(&before, name)?;
    let rec = shared.store.step(&prot.name, |s, p| s.reprotect(p)).await?;
    let done = if before.fenced.is_some() && rec.reprotect {
        vec![format!(
            "lifted the fence of protection {name}: the next cycle takes the DR site's epoch and replicates again"
        )]
    } else {
        vec![format!("protection {name} was not fenced; nothing changed")]
    };
    tracing::warn!(protection = name, "re-protected: the fence is lifted");
    Ok(done)
}
