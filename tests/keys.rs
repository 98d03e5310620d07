//! Keys, certificates and the daemon's directories: a private key open to group or others
//! stops `run` and `check-config`; the daemon's directories are private; the expiry metric
//! is the notAfter of the certificate in use; SIGHUP reloads rotated material for new
//! connections, and a bad reload keeps what was in use.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lifeboat::net::tls::TlsFiles;
use support::*;

const SITE_EXPIRY: &str = "lifeboat_certificate_expiry_timestamp_seconds{certificate=\"site\"}";
const CA_EXPIRY: &str = "lifeboat_certificate_expiry_timestamp_seconds{certificate=\"ca\"}";
const RELOAD_OK: &str = "lifeboat_tls_reloads_total{result=\"ok\"}";
const RELOAD_ERROR: &str = "lifeboat_tls_reloads_total{result=\"error\"}";

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `lifeboat ARGS` to its end: its exit code and stderr. A daemon still running after
/// 60 s is killed and the test fails (it should have refused to start).
fn lifeboat(args: &[&str], dir: &Path) -> (Option<i32>, String) {
    let err_file = dir.join("lifeboat-cmd.err");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lifeboat"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err_file).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "lifeboat {args:?} kept running:\n{}",
                fs::read_to_string(&err_file).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), fs::read_to_string(&err_file).unwrap())
}

/// A fingerprint (blake3 of the DER) of the first certificate in a PEM file.
fn fingerprint(pem: &Path) -> String {
    let bytes = fs::read(pem).unwrap();
    let der = x509_parser::pem::parse_x509_pem(&bytes).unwrap().1.contents;
    blake3::hash(&der).to_hex().to_string()
}

/// notAfter of the first certificate in a PEM file, parsed here independently of lifeboat.
fn not_after(pem: &Path) -> i64 {
    let bytes = fs::read(pem).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&bytes).unwrap();
    let cert = pem.parse_x509().unwrap();
    cert.validity().not_after.timestamp()
}

/// Signs a new key's certificate for `site`, valid until `until` (y, m, d), with the pair
/// CA in `ca_dir`, and writes `site.pem` and `site.key` (mode 0600) into `out`. Returns
/// notAfter as Unix seconds.
fn sign_site(ca_dir: &Path, site: &str, until: (i32, u8, u8), out: &Path) -> i64 {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa};
    let ca_key =
        rcgen::KeyPair::from_pem(&fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    // The CA's subject as `lifeboat certs` makes it, so the issuer name matches.
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "lifeboat pair CA");
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let mut params = CertificateParams::new(vec![
        site.to_string(),
        "localhost".into(),
        "127.0.0.1".into(),
    ])
    .unwrap();
    params.distinguished_name.push(DnType::CommonName, site);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    fs::create_dir_all(out).unwrap();
    fs::write(out.join(format!("{site}.pem")), cert.pem()).unwrap();
    let key_path = out.join(format!("{site}.key"));
    fs::write(&key_path, key.serialize_pem()).unwrap();
    chmod(&key_path, 0o600);
    params.not_after.unix_timestamp()
}

fn files(dir: &Path, site: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{site}.pem")),
        key: dir.join(format!("{site}.key")),
    }
}

/// The fingerprint of the certificate the DR site presents to a new connection from a client with `client`
/// material (trusting its CA), or why the connection failed.
fn presented(port: u16, client: &TlsFiles) -> Result<String, String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let tls = lifeboat::net::tls::client_config(client).map_err(|e| format!("{e:#}"))?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let connecting = ep.connect(addr, "dr").unwrap();
        let conn = tokio::time::timeout(Duration::from_secs(20), connecting)
            .await
            .expect("the DR site neither answered nor refused")
            .map_err(|e| e.to_string())?;
        let chain = conn
            .peer_identity()
            .expect("a TLS connection has a peer identity")
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .unwrap();
        conn.close(0u32.into(), b"done");
        Ok(blake3::hash(&chain[0]).to_hex().to_string())
    })
}

/// Waits until `sample` on the site's /metrics is `want` (a reload runs after SIGHUP is
/// delivered); returns the metrics text.
fn wait_metric(site: &SiteProc, sample: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = site.metrics();
        if metric(&m, sample) == Some(want) {
            return m;
        }
        if Instant::now() > deadline {
            panic!("{sample} never became {want}:\n{m}\n{}", site.log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sync_and_compare(pair: &Pair, seed: u64) {
    pair.change_all(16, seed);
    pair.sync();
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

#[test]
fn a_private_key_open_to_others_stops_run_and_check_config() {
    let pair = Pair::new(PairOptions {
        start: false,
        ..Default::default()
    });
    let cfg = pair.dr.config.to_str().unwrap();
    let key = pair.dir.path().join("certs/dr.key");
    let (code, err) = lifeboat(&["check-config", cfg], pair.dir.path());
    assert_eq!(code, Some(0), "the key as `certs` writes it passes: {err}");

    chmod(&key, 0o644);
    let expected = format!(
        "tls.key: {} has mode 0644, open to group or others; expected 0600 or stricter",
        key.display()
    );
    let (code, err) = lifeboat(&["check-config", cfg], pair.dir.path());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&expected), "{err}");

    let (code, err) = lifeboat(&["run", "--config", cfg], pair.dir.path());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&expected), "{err}");
    assert!(
        !pair.dr.state_dir.exists(),
        "run made its state_dir before refusing"
    );
}

#[test]
fn the_daemons_directories_are_private() {
    // A shell's usual umask, which the daemons inherit: directories made without a mode
    // would be 0755.
    unsafe { libc::umask(0o022) };
    let mut pair = Pair::new(PairOptions {
        start: false,
        ..Default::default()
    });
    // An existing state_dir open to others is tightened.
    fs::create_dir(&pair.primary.state_dir).unwrap();
    chmod(&pair.primary.state_dir, 0o755);
    pair.start();
    let r = pair.sync();
    let gen_dir = pair.snapshot(r.gen, "v1").parent().unwrap().to_path_buf();
    let dr = &pair.dr.state_dir;
    let primary = &pair.primary.state_dir;
    for dir in [
        dr.clone(),
        dr.join("staging"),
        primary.clone(),
        primary.join("snapshots"),
        primary.join("snapshots").join(PROT),
        gen_dir,
    ] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    let log = pair.primary.log_text();
    assert!(
        log.contains("state_dir was open to group or others; set it to 0700")
            && log.contains("0755"),
        "{log}"
    );
}

#[test]
fn the_expiry_metric_is_the_not_after_of_the_certificate_in_use() {
    let mut pair = Pair::new(PairOptions {
        start: false,
        ..Default::default()
    });
    let certs = pair.dir.path().join("certs");
    let chosen = sign_site(&certs, "dr", (2036, 5, 17), &certs);
    pair.start();
    let dr_not_after = not_after(&certs.join("dr.pem"));
    assert_eq!(dr_not_after, chosen);
    let m = pair.dr.metrics();
    assert_eq!(metric(&m, SITE_EXPIRY), Some(dr_not_after as f64), "{m}");
    assert_eq!(
        metric(&m, CA_EXPIRY),
        Some(not_after(&certs.join("ca.pem")) as f64),
        "{m}"
    );
    // The primary shows its own certificate's, which `certs` made with another date.
    let primary_not_after = not_after(&certs.join("primary.pem"));
    assert_ne!(primary_not_after, dr_not_after);
    let m = pair.primary.metrics();
    assert_eq!(
        metric(&m, SITE_EXPIRY),
        Some(primary_not_after as f64),
        "{m}"
    );
    // The pair works with the re-signed certificate.
    pair.sync();
    // The alert is on this metric, 14 days ahead of notAfter.
    let alerts = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/alerts.yaml");
    let v: serde_json::Value =
        serde_saphyr::from_str(&fs::read_to_string(alerts).unwrap()).unwrap();
    let rule = v["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["alert"] == "LifeboatCertificateExpiresSoon")
        .expect("the expiry alert");
    let expr = rule["expr"].as_str().unwrap();
    let metric_name = SITE_EXPIRY.split('{').next().unwrap();
    assert_eq!(
        expr,
        format!("{metric_name} - time() < 14 * 86400"),
        "{rule}"
    );
}

#[test]
fn sighup_gives_new_connections_the_dr_sites_rotated_certificate_and_a_bad_reload_keeps_it() {
    let mut pair = Pair::new(PairOptions::default());
    let port = pair.quic_port;
    let certs = pair.dir.path().join("certs");
    let client = files(&certs, "primary");
    pair.sync();
    let old = fingerprint(&certs.join("dr.pem"));
    assert_eq!(presented(port, &client), Ok(old.clone()));

    let rotated = sign_site(&certs, "dr", (2036, 5, 17), &certs);
    let new = fingerprint(&certs.join("dr.pem"));
    assert_ne!(new, old);
    // New files alone change nothing.
    assert_eq!(presented(port, &client), Ok(old.clone()));

    pair.dr.signal(libc::SIGHUP);
    let m = wait_metric(&pair.dr, RELOAD_OK, 1.0);
    assert_eq!(metric(&m, SITE_EXPIRY), Some(rotated as f64), "{m}");
    assert_eq!(presented(port, &client), Ok(new.clone()));
    // A primary that connects anew verifies the rotated certificate and replicates.
    pair.primary.stop();
    pair.primary.start();
    sync_and_compare(&pair, 1);

    // A key open to others is refused: the reload fails and the rotated material stays.
    let key = certs.join("dr.key");
    chmod(&key, 0o644);
    pair.dr.signal(libc::SIGHUP);
    let m = wait_metric(&pair.dr, RELOAD_ERROR, 1.0);
    assert_eq!(metric(&m, RELOAD_OK), Some(1.0), "{m}");
    assert_eq!(metric(&m, SITE_EXPIRY), Some(rotated as f64), "{m}");
    let log = pair.dr.log_text();
    assert!(
        log.contains("TLS reload failed")
            && log.contains(&format!("{} has mode 0644", key.display())),
        "{log}"
    );
    assert_eq!(presented(port, &client), Ok(new.clone()));

    // A certificate that does not match the key (half a rotation) is refused too.
    chmod(&key, 0o600);
    let other = pair.dir.path().join("other");
    sign_site(&certs, "dr", (2038, 2, 3), &other);
    fs::copy(other.join("dr.pem"), certs.join("dr.pem")).unwrap();
    pair.dr.signal(libc::SIGHUP);
    let m = wait_metric(&pair.dr, RELOAD_ERROR, 2.0);
    assert_eq!(metric(&m, SITE_EXPIRY), Some(rotated as f64), "{m}");
    assert_eq!(presented(port, &client), Ok(new));
    sync_and_compare(&pair, 2);

    // No key material in the log.
    let key_line = fs::read_to_string(&key)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    for log in [pair.dr.log_text(), pair.primary.log_text()] {
        assert!(!log.contains("PRIVATE KEY") && !log.contains(&key_line));
    }
}

#[test]
fn sighup_at_both_sites_moves_the_pair_to_a_new_ca_without_a_restart() {
    let pair = Pair::new(PairOptions::default());
    let port = pair.quic_port;
    let d = pair.dir.path();
    let certs = d.join("certs");
    pair.sync();
    let connects = |p: &Pair| p.primary.log_text().matches("connected to DR site").count();
    let before = connects(&pair);

    // A new pair CA with new certificates for both sites, copied over the old files.
    let old = d.join("old");
    let new = d.join("new");
    fs::create_dir(&old).unwrap();
    lifeboat::net::tls::generate(&new, &["primary".into(), "dr".into()], &[]).unwrap();
    for f in ["ca.pem", "primary.pem", "primary.key", "dr.pem", "dr.key"] {
        fs::copy(certs.join(f), old.join(f)).unwrap();
        fs::copy(new.join(f), certs.join(f)).unwrap();
    }
    assert_eq!(mode(&certs.join("dr.key")), 0o600);
    // Until the reload the DR site presents the old certificate: a client of the new CA
    // refuses it.
    assert!(presented(port, &files(&new, "primary")).is_err());

    pair.dr.signal(libc::SIGHUP);
    pair.primary.signal(libc::SIGHUP);
    wait_metric(&pair.dr, RELOAD_OK, 1.0);
    wait_metric(&pair.primary, RELOAD_OK, 1.0);

    // The primary's next cycle connects anew, with the new material: the DR site now
    // trusts only the new CA and presents only the new certificate.
    sync_and_compare(&pair, 3);
    assert_eq!(connects(&pair), before + 1, "{}", pair.primary.log_text());
    assert_eq!(
        presented(port, &files(&new, "primary")),
        Ok(fingerprint(&new.join("dr.pem")))
    );
    let refused = presented(port, &files(&old, "primary"));
    assert!(refused.is_err(), "a client of the old CA got {refused:?}");
}
