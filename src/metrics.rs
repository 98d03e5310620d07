//! Every metric in one place. Names start with `lifeboat_` and carry their unit; label sets
//! are bounded (protection names come from the config, error kinds from [`ErrorKind`]).

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Error kinds as metric label values: a fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Peer,
    Tls,
    Protocol,
    Refused,
    Fenced,
    Hook,
    Snapshot,
    Io,
    Store,
    Verify,
    Kubernetes,
    /// A DR replica changed outside lifeboat.
    Replica,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Peer => "peer",
            ErrorKind::Tls => "tls",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Refused => "refused",
            ErrorKind::Fenced => "fenced",
            ErrorKind::Hook => "hook",
            ErrorKind::Snapshot => "snapshot",
            ErrorKind::Io => "io",
            ErrorKind::Store => "store",
            ErrorKind::Verify => "verify",
            ErrorKind::Kubernetes => "kubernetes",
            ErrorKind::Replica => "replica",
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub rpo_seconds: GaugeVec,
    pub rpo_target_seconds: GaugeVec,
    pub consistent_gen: IntGaugeVec,
    pub recovery_points: IntGaugeVec,
    pub cycle_running: IntGaugeVec,
    pub cycle_progress_bytes: IntGaugeVec,
    pub cycle_pending_bytes: IntGaugeVec,
    pub cycle_eta_seconds: GaugeVec,
    pub oldest_point_age: GaugeVec,
    pub epoch: IntGaugeVec,
    pub cycle_seconds: HistogramVec,
    pub phase_seconds: GaugeVec,
    pub freeze_seconds: GaugeVec,
    pub scanned_bytes: IntCounterVec,
    pub changed_bytes: IntCounterVec,
    pub sent_bytes: IntCounterVec,
    pub wire_bytes: IntCounterVec,
    pub received_bytes: IntCounterVec,
    pub chunks_sent: IntCounterVec,
    pub compression_saved_bytes: IntCounterVec,
    pub cycles: IntCounterVec,
    pub errors: IntCounterVec,
    pub peer_connected: IntGaugeVec,
    pub failover_seconds: GaugeVec,
    pub hook_failures: IntCounterVec,
    pub replica_check_failures: IntCounterVec,
    /// notAfter of this site's certificate (`certificate="site"`) and its CA (`"ca"`).
    pub certificate_expiry: IntGaugeVec,
    pub tls_reloads: IntCounterVec,
    /// Kubernetes CSI path: movers running now, and mover ends by result (bounded set).
    pub movers_running: IntGaugeVec,
    pub movers: IntCounterVec,
    pub mover_sent_bytes: IntCounterVec,
    pub mover_cbt: IntCounterVec,
    /// DR site: drills by result, when one last passed, and the recovery time it measured.
    pub drills: IntCounterVec,
    pub drill_last_success: GaugeVec,
    pub drill_seconds: GaugeVec,
    /// DR site: replicas or points found to differ from the DR index (verify, scrub),
    /// when a scrub pass last found everything equal, and the bytes it re-read.
    pub verify_failures: IntCounterVec,
    pub scrub_last_clean: GaugeVec,
    pub scrub_bytes: IntCounterVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let p = &["protection"];
        Metrics {
            rpo_seconds: reg(&r, GaugeVec::new(Opts::new("lifeboat_rpo_seconds", "Seconds since the snapshot of the consistent point (the RPO actually achieved)"), p).unwrap()),
            rpo_target_seconds: reg(&r, GaugeVec::new(Opts::new("lifeboat_rpo_target_seconds", "Configured RPO target"), p).unwrap()),
            consistent_gen: reg(&r, IntGaugeVec::new(Opts::new("lifeboat_consistent_gen", "Gen of the consistent point (DR) or acknowledged base (primary)"), p).unwrap()),
            cycle_running: reg(&r, IntGaugeVec::new(Opts::new("lifeboat_cycle_running", "1 while a cycle of the protection transfers (from its snapshot to its commit)"), p).unwrap()),
            cycle_progress_bytes: reg(&r, IntGaugeVec::new(Opts::new("lifeboat_cycle_progress_bytes", "Bytes of the running cycle's volumes scanned and sent so far"), p).unwrap()),
            cycle_pending_bytes: reg(&r, IntGaugeVec::new(Opts::new("lifeboat_cycle_pending_bytes", "Bytes of the running cycle's volumes still to scan and send (0 when no cycle runs)"), p).unwrap()),
            cycle_eta_seconds: reg(&r, GaugeVec::new(Opts::new("lifeboat_cycle_eta_seconds", "Estimated seconds until the running cycle's transfer ends, at its rate so far (NaN before the first byte)"), p).unwrap()),
            recovery_points: reg(&r, IntGaugeVec::new(Opts::new("lifeboat_recovery_points", "Recovery points the DR site keeps (Kubernetes mode, CSI replicas)"), p).unwrap()),
            oldest_point_age: reg(&r, GaugeVec::new(Opts::new("lifeboat_recovery_point_oldest_age_seconds", "Age of the oldest kept recovery point's snapshot: how far back a failover can go"), p).unwrap()),
            epoch: reg(&r, IntGaugeVec::new(Opts::new("lifeboat_epoch", "Epoch of the protection at this site"), p).unwrap()),
            cycle_seconds: reg(&r, HistogramVec::new(HistogramOpts::new("lifeboat_cycle_duration_seconds", "Duration of successful replication cycles").buckets(vec![0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0, 1800.0]), p).unwrap()),
            phase_seconds: reg(&r, GaugeVec::new(Opts::new("lifeboat_cycle_phase_seconds", "Duration of each phase of the last cycle"), &["protection", "phase"]).unwrap()),
            freeze_seconds: reg(&r, GaugeVec::new(Opts::new("lifeboat_freeze_seconds", "Freeze window of the last group snapshot (first pre command start to last post command end)"), p).unwrap()),
            scanned_bytes: reg(&r, IntCounterVec::new(Opts::new("lifeboat_scanned_bytes_total", "Bytes of snapshots read and hashed"), p).unwrap()),
            changed_bytes: reg(&r, IntCounterVec::new(Opts::new("lifeboat_changed_bytes_total", "Bytes of chunks that differed from the base"), p).unwrap()),
            sent_bytes: reg(&r, IntCounterVec::new(Opts::new("lifeboat_sent_bytes_total", "Bytes of chunk frames sent to the peer"), p).unwrap()),
            wire_bytes: reg(&r, IntCounterVec::new(Opts::new("lifeboat_wire_bytes_total", "UDP bytes sent on the peer connection during cycles"), p).unwrap()),
            received_bytes: reg(&r, IntCounterVec::new(Opts::new("lifeboat_received_bytes_total", "Bytes of frames received from the peer"), p).unwrap()),
            chunks_sent: reg(&r, IntCounterVec::new(Opts::new("lifeboat_chunks_sent_total", "Chunks sent (data and zero markers)"), p).unwrap()),
            compression_saved_bytes: reg(&r, IntCounterVec::new(Opts::new("lifeboat_compression_saved_bytes_total", "Chunk bytes not sent thanks to compression"), p).unwrap()),
            cycles: reg(&r, IntCounterVec::new(Opts::new("lifeboat_cycles_total", "Replication cycles by result"), &["protection", "result"]).unwrap()),
            errors: reg(&r, IntCounterVec::new(Opts::new("lifeboat_errors_total", "Errors by kind"), &["protection", "kind"]).unwrap()),
            peer_connected: reg(&r, IntGaugeVec::new(Opts::new("lifeboat_peer_connected", "1 while the QUIC connection to the peer is up"), &["peer"]).unwrap()),
            failover_seconds: reg(&r, GaugeVec::new(Opts::new("lifeboat_failover_duration_seconds", "Duration of the last failover"), p).unwrap()),
            hook_failures: reg(&r, IntCounterVec::new(Opts::new("lifeboat_hook_failures_total", "Rule actions (pre, background, post) that failed or timed out"), p).unwrap()),
            replica_check_failures: reg(&r, IntCounterVec::new(Opts::new("lifeboat_replica_check_failures_total", "DR replicas found changed outside lifeboat (deleted, truncated, replaced, written) before a cycle"), p).unwrap()),
            certificate_expiry: reg(&r, IntGaugeVec::new(Opts::new("lifeboat_certificate_expiry_timestamp_seconds", "notAfter of the TLS certificate in use, as Unix seconds"), &["certificate"]).unwrap()),
            movers_running: reg(&r, IntGaugeVec::new(Opts::new("lifeboat_mover_running", "Mover Jobs of the protection running now"), p).unwrap()),
            movers: reg(&r, IntCounterVec::new(Opts::new("lifeboat_mover_total", "Mover Jobs ended, by result (ok, failed, stuck, unschedulable)"), &["protection", "result"]).unwrap()),
            mover_sent_bytes: reg(&r, IntCounterVec::new(Opts::new("lifeboat_mover_sent_bytes_total", "Chunk bytes the protection's movers sent to the DR site"), p).unwrap()),
            drills: reg(&r, IntCounterVec::new(Opts::new("lifeboat_drills_total", "Drills of the protection's recovery points, by result (passed, failed)"), &["protection", "result"]).unwrap()),
            drill_last_success: reg(&r, GaugeVec::new(Opts::new("lifeboat_drill_last_success_timestamp_seconds", "When a drill of the protection last passed (Unix time)"), p).unwrap()),
            drill_seconds: reg(&r, GaugeVec::new(Opts::new("lifeboat_drill_seconds", "Recovery time the last passed drill measured: cloning the point and the check, in seconds"), p).unwrap()),
            mover_cbt: reg(&r, IntCounterVec::new(Opts::new("lifeboat_mover_cbt_total", "Movers that asked the driver's SnapshotMetadata service, by result: delta or allocated (only its ranges read), failed (the call failed: whole volume read), mismatch (a sampled chunk it left out had changed: whole volume read)"), &["protection", "result"]).unwrap()),
            verify_failures: reg(&r, IntCounterVec::new(Opts::new("lifeboat_verify_failures_total", "Replicas (or recovery points) that verify or the background scrub found differing from the DR index; a replica is then repaired by the next cycle"), p).unwrap()),
            scrub_last_clean: reg(&r, GaugeVec::new(Opts::new("lifeboat_scrub_last_clean_timestamp_seconds", "When a full background scrub pass last found every replica equal to the DR index (Unix time)"), p).unwrap()),
            scrub_bytes: reg(&r, IntCounterVec::new(Opts::new("lifeboat_scrub_read_bytes_total", "Bytes the background scrub re-read from the replicas"), p).unwrap()),
            tls_reloads: reg(&r, IntCounterVec::new(Opts::new("lifeboat_tls_reloads_total", "TLS material reloads (SIGHUP) by result; a failed one keeps the material in use"), &["result"]).unwrap()),
            registry: r,
        }
    }

    pub fn error(&self, protection: &str, kind: ErrorKind) {
        self.errors
            .with_label_values(&[protection, kind.as_str()])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
