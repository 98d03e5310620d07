//! TLS material for a pair: `lifeboat certs` makes a pair CA and one certificate per site;
//! the daemons load them into rustls configs that demand mutual TLS and the lifeboat ALPN.
//!
//! Any certificate signed by the pair CA is a member of the pair. Key files are written with
//! mode 0600, refused when open to group or others, and never logged. [`expiry`] reads the
//! certificates' notAfter for the expiry metric.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::net::wire::ALPN;

/// Paths of one site's TLS material.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What `certs` wrote.
#[derive(Debug)]
pub struct Generated {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub sites: Vec<(String, TlsFiles)>,
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).with_context(|| {
        format!(
            "create {} (lifeboat never overwrites TLS material; remove it first to replace it)",
            path.display()
        )
    })?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}

/// Creates a pair CA and a certificate for each site in `out`. Each site certificate names
/// the site (the peer's `server_name`), plus `localhost`, 127.0.0.1 and `extra_sans`.
pub fn generate(out: &Path, sites: &[String], extra_sans: &[String]) -> Result<Generated> {
    if sites.is_empty() {
        bail!("name at least one site to make a certificate for");
    }
    fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let ca_key = KeyPair::generate().context("generate CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "lifeboat pair CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).context("sign CA")?;
    let issuer = Issuer::new(ca_params, &ca_key);
    let ca_cert_path = out.join("ca.pem");
    let ca_key_path = out.join("ca.key");
    write_file(&ca_cert_path, &ca_cert.pem(), false)?;
    write_file(&ca_key_path, &ca_key.serialize_pem(), true)?;

    let mut generated = Vec::new();
    for site in sites {
        crate::ids::check_name(site).map_err(|e| anyhow::anyhow!("site name {e}"))?;
        let mut sans = vec![site.clone(), "localhost".into(), "127.0.0.1".into()];
        sans.extend(extra_sans.iter().cloned());
        let mut params = CertificateParams::new(sans)
            .with_context(|| format!("subject names for site {site}"))?;
        params.distinguished_name.push(DnType::CommonName, site);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let files = TlsFiles {
            ca: ca_cert_path.clone(),
            cert: out.join(format!("{site}.pem")),
            key: out.join(format!("{site}.key")),
        };
        write_file(&files.cert, &cert.pem(), false)?;
        write_file(&files.key, &key.serialize_pem(), true)?;
        generated.push((site.clone(), files));
    }
    Ok(Generated {
        ca_cert: ca_cert_path,
        ca_key: ca_key_path,
        sites: generated,
    })
}

/// The files each Kustomize overlay's `lifeboat-tls` secretGenerator reads, in its `tls/`.
pub const OVERLAY_TLS_FILES: [&str; 3] = ["ca.pem", "site.pem", "site.key"];

/// Refuses, before anything is generated, a `--kubernetes` directory without an overlay
/// (a `kustomization.yaml`) for every site.
pub fn check_overlays(dir: &Path, sites: &[String]) -> Result<()> {
    for site in sites {
        let k = dir.join(site).join("kustomization.yaml");
        if !k.is_file() {
            bail!(
                "{} does not exist: --kubernetes names the directory holding one Kustomize overlay per site (deploy/kubernetes, with primary/ and dr/)",
                k.display()
            );
        }
    }
    Ok(())
}

/// Copies the CA certificate and each site's certificate and key into that site's overlay,
/// `dir/SITE/tls/` (a 0700 directory; the key 0600), under the names of
/// [`OVERLAY_TLS_FILES`]. The CA key stays where [`generate`] wrote it. Existing files are
/// never overwritten. Returns each site's directory.
pub fn write_overlays(g: &Generated, dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut written = Vec::new();
    for (site, files) in &g.sites {
        let tls = dir.join(site).join("tls");
        fs::create_dir_all(&tls).with_context(|| format!("create {}", tls.display()))?;
        fs::set_permissions(&tls, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", tls.display()))?;
        let [ca, cert, key] = OVERLAY_TLS_FILES;
        for (from, name, secret) in [
            (&g.ca_cert, ca, false),
            (&files.cert, cert, false),
            (&files.key, key, true),
        ] {
            let text =
                fs::read_to_string(from).with_context(|| format!("read {}", from.display()))?;
            write_file(&tls.join(name), &text, secret)?;
        }
        written.push((site.clone(), tls));
    }
    Ok(written)
}

/// Why `key` must not be used as a private key file: its mode lets group or others at it.
/// `None` when the mode is private, or when the file cannot be looked at (reading it
/// reports that, naming the file).
pub fn loose_key(key: &Path) -> Option<String> {
    let mode = fs::metadata(key).ok()?.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{} has mode {mode:04o}, open to group or others; expected 0600 or stricter (chmod 600 {})",
            key.display(),
            key.display()
        )
    })
}

/// The PEM certificates in `path`, at least one.
fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("read {what} {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse {what} {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// When a site's TLS material stops working, as Unix seconds of notAfter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// This site's certificate: the first in its file.
    pub site: i64,
    /// The CA certificate that issued it (by subject), else the CA file's first.
    pub ca: i64,
}

/// Reads both notAfter dates from the files. x509-parser, because rustls and webpki check
/// validity during a handshake but do not expose the dates.
pub fn expiry(files: &TlsFiles) -> Result<Expiry> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let site = certs(&files.cert, "certificate")?;
    let cas = certs(&files.ca, "CA certificate")?;
    let parse = |der: &CertificateDer<'static>, path: &Path| -> Result<(Vec<u8>, Vec<u8>, i64)> {
        let (_, c) = X509Certificate::from_der(der.as_ref())
            .map_err(|e| anyhow::anyhow!("parse X.509 certificate in {}: {e}", path.display()))?;
        Ok((
            c.subject().as_raw().to_vec(),
            c.issuer().as_raw().to_vec(),
            c.validity().not_after.timestamp(),
        ))
    };
    let (_, issuer, site_not_after) = parse(&site[0], &files.cert)?;
    let cas = cas
        .iter()
        .map(|c| parse(c, &files.ca))
        .collect::<Result<Vec<_>>>()?;
    let ca = cas.iter().find(|(subject, _, _)| *subject == issuer);
    Ok(Expiry {
        site: site_not_after,
        ca: ca.unwrap_or(&cas[0]).2,
    })
}

struct Loaded {
    roots: Arc<rustls::RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load(files: &TlsFiles) -> Result<Loaded> {
    if let Some(why) = loose_key(&files.key) {
        bail!("private key {why}");
    }
    load_unchecked(files)
}

fn load_unchecked(files: &TlsFiles) -> Result<Loaded> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs(&files.ca, "CA certificate")? {
        roots
            .add(ca)
            .with_context(|| format!("use {} as a trust anchor", files.ca.display()))?;
    }
    let chain = certs(&files.cert, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("read private key {}", files.key.display()))?;
    Ok(Loaded {
        roots: Arc::new(roots),
        chain,
        key,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The DR side: requires a client certificate from the pair CA.
pub fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig> {
    let l = load(files)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(l.roots, provider())
        .build()
        .context("build client certificate verifier")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(l.chain, l.key)
        .with_context(|| format!("use key {} with its certificate", files.key.display()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The primary side: verifies the DR site against the pair CA and presents its own cert.
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig> {
    let l = load(files)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(l.roots)
        .with_client_auth_cert(l.chain, l.key)
        .with_context(|| format!("use key {} with its certificate", files.key.display()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// A mover's client config (a non-root Pod under the `restricted` Pod Security level):
/// the kubelet makes a Secret file readable to the pod's user only through its group
/// (fsGroup), so group read is accepted; read by others still is not.
pub fn mover_client_config(files: &TlsFiles) -> Result<rustls::ClientConfig> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = fs::metadata(&files.key) {
        let mode = m.permissions().mode() & 0o7777;
        if mode & 0o007 != 0 {
            bail!(
                "private key {} has mode {mode:04o}, readable by others; expected the Secret's defaultMode 0400 or 0440",
                files.key.display()
            );
        }
    }
    let l = load_unchecked(files)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(l.roots)
        .with_client_auth_cert(l.chain, l.key)
        .with_context(|| format!("use key {} with its certificate", files.key.display()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_material_builds_both_configs_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let g = generate(dir.path(), &["primary".into(), "dr".into()], &[]).unwrap();
        for (_, files) in &g.sites {
            server_config(files).unwrap();
            client_config(files).unwrap();
            let mode = fs::metadata(&files.key).unwrap().permissions();
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(mode.mode() & 0o777, 0o600);
        }
        // A second run refuses to overwrite.
        let err = generate(dir.path(), &["primary".into()], &[]).unwrap_err();
        assert!(format!("{err:#}").contains("never overwrites"), "{err:#}");
    }

    #[test]
    fn a_key_open_to_group_or_others_is_refused_by_both_configs() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let g = generate(dir.path(), &["dr".into()], &[]).unwrap();
        let files = &g.sites[0].1;
        fs::set_permissions(&files.key, fs::Permissions::from_mode(0o640)).unwrap();
        let want = format!("private key {} has mode 0640", files.key.display());
        let err = format!("{:#}", server_config(files).unwrap_err());
        assert!(err.contains(&want), "{err}");
        let err = format!("{:#}", client_config(files).unwrap_err());
        assert!(err.contains(&want), "{err}");
    }

    #[test]
    fn missing_files_are_named() {
        let files = TlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/c.key".into(),
        };
        let err = format!("{:#}", server_config(&files).unwrap_err());
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
