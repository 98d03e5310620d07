//! Failback, the failed-over site's half: the old primary asks this site (where the
//! application runs now) to send the protection from now on. Under the protection's lock,
//! so no cycle, failover or verify is half done when the direction changes; the answer is
//! the new epoch, and asking again gives the same one.

use crate::ids::now_ms;
use crate::net::wire::{FrameWriter, Msg, Refusal};
use crate::site::dr::Dr;

/// Answers `peer`'s failback request for `protection` on `w`.
pub async fn answer(dr: &Dr, peer: &str, protection: &str, w: &mut FrameWriter) {
    let answer = match turn(dr, peer, protection).await {
        Ok(msg) => msg,
        Err(why) => {
            tracing::warn!(peer, protection, %why, "refused a failback");
            Msg::Refused(Refusal::NoFailback(why))
        }
    };
    let _ = w.send(&answer).await;
    w.finish();
}

async fn turn(dr: &Dr, peer: &str, protection: &str) -> Result<Msg, String> {
    let site = &dr.config.site_name;
    let prot = dr
        .protection(protection)
        .map_err(|e| e.to_string())?
        .clone();
    if prot.kubernetes.is_some() {
        return Err(format!(
            "protection {protection} is a Kubernetes protection; failback works for local-mode protections only in this release: re-protect it (`lifeboat reprotect`) instead"
        ));
    }
    if dr.config.peer.is_none() {
        return Err(format!(
            "site {site} has no [peer], so it cannot send {protection} back to {peer}: add [peer] with the address of {peer}'s [listen] and server_name = {peer:?}, restart it, and run failback again"
        ));
    }
    let lock = dr.lock_of(protection).expect("a lock per protection");
    let _locked = lock.lock().await;
    let (name, p, at) = (prot.name.clone(), peer.to_string(), now_ms());
    let rec = dr
        .store
        .step(&name, move |s, n| s.turn_to_sender(n, &p, at))
        .await
        .map_err(|e| format!("protection {protection} at site {site}: {e:#}"))?;
    dr.turned();
    let gen = rec.failed_over.as_ref().and_then(|f| f.gen);
    tracing::warn!(
        protection,
        peer,
        epoch = %rec.epoch,
        "failback: this site sends the protection from now on"
    );
    Ok(Msg::TurnedAround {
        epoch: rec.epoch,
        gen,
    })
}
