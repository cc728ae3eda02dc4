//! A development certificate authority and the certificates it issues (`anthill certs`), for
//! local clusters, the demo and the test labs. Production sites bring their own CA
//! (cert-manager on Kubernetes, their PKI on bare metal); docs/security.md says what the
//! certificates must contain, and this module is the reference.
//!
//! - The CA: self-signed, may sign leaf certificates only (path length 0).
//! - A node: common name and first DNS name = its `node_id` (peers check the DNS name), then
//!   the host names and addresses clients reach it by; usable for server and client
//!   authentication (a node is a client of its peers).
//! - A client: common name = who it is (the principal authorization is about), no DNS name (so
//!   it can never pass for a member), client authentication only.
//!
//! Keys are ECDSA P-256, written in PKCS#8 PEM and readable by their owner only.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CertsError {
    #[error("{path} exists; remove it first or pick another directory (existing keys are never overwritten)")]
    Exists { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

/// What a certificate is for.
#[derive(Debug, Clone)]
pub enum Kind {
    Ca,
    /// A node: its name and the hosts (names or addresses) it is reached at.
    Node {
        hosts: Vec<String>,
    },
    Client,
}

/// A certificate and its key, in PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The files one `anthill certs` command wrote (its report).
#[derive(Debug, Serialize)]
pub struct Written {
    pub kind: &'static str,
    pub name: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub not_after: String,
}

/// A certificate for `name` of `kind`, valid for `days`, signed by `ca` (self-signed for a CA).
pub fn issue(kind: &Kind, name: &str, days: u32, ca: Option<&Issued>) -> Result<Issued, CertsError> {
    let invalid = |reason: String| CertsError::Invalid { what: format!("certificate {name:?}"), reason };
    if name.trim().is_empty() {
        return Err(invalid("the name must not be empty".into()));
    }
    if days == 0 {
        return Err(invalid("--days must be at least 1".into()));
    }
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| invalid(e.to_string()))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(i64::from(days));
    match kind {
        Kind::Ca => {
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        }
        Kind::Node { hosts } => {
            params.subject_alt_names.push(dns(name).map_err(invalid)?);
            for host in hosts {
                let san = match host.parse::<IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => dns(host).map_err(invalid)?,
                };
                if !params.subject_alt_names.contains(&san) {
                    params.subject_alt_names.push(san);
                }
            }
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        }
        Kind::Client => {
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    params.use_authority_key_identifier_extension = !matches!(kind, Kind::Ca);
    let key = KeyPair::generate().map_err(|e| invalid(e.to_string()))?;
    let cert = match ca {
        None => params.self_signed(&key),
        Some(ca) => {
            let ca_key =
                KeyPair::from_pem(&ca.key_pem).map_err(|e| CertsError::Invalid { what: "the CA key".into(), reason: e.to_string() })?;
            let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)
                .map_err(|e| CertsError::Invalid { what: "the CA certificate".into(), reason: e.to_string() })?;
            params.signed_by(&key, &issuer)
        }
    }
    .map_err(|e| invalid(e.to_string()))?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

fn dns(name: &str) -> Result<SanType, String> {
    if rustls_pki_types::DnsName::try_from(name).is_err() {
        return Err(format!("{name:?} is not a DNS name or an IP address"));
    }
    name.to_string().try_into().map(SanType::DnsName).map_err(|e: rcgen::Error| e.to_string())
}

/// The CA in `dir` (`ca.crt`, `ca.key`).
pub fn read_ca(dir: &Path) -> Result<Issued, CertsError> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).map_err(|source| CertsError::Read { path, source })
    };
    Ok(Issued { cert_pem: read("ca.crt")?, key_pem: read("ca.key")? })
}

/// Writes `issued` as `dir/<file_stem>.crt` and `.key` (the key readable by its owner only);
/// refuses to replace either file.
pub fn write(dir: &Path, file_stem: &str, issued: &Issued) -> Result<(PathBuf, PathBuf), CertsError> {
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Write { path: dir.to_path_buf(), source })?;
    let (cert_file, key_file) = (dir.join(format!("{file_stem}.crt")), dir.join(format!("{file_stem}.key")));
    for path in [&cert_file, &key_file] {
        if path.exists() {
            return Err(CertsError::Exists { path: path.clone() });
        }
    }
    write_new(&key_file, issued.key_pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&cert_file, issued.cert_pem.as_bytes(), 0o644) {
        // A key without its certificate would only block the next attempt.
        let _ = std::fs::remove_file(&key_file);
        return Err(e);
    }
    Ok((cert_file, key_file))
}

/// Writes a file that must not exist yet, with `mode`, whole or not at all (a temporary file
/// renamed into place).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |source| CertsError::Write { path: path.to_path_buf(), source };
    let temporary = path.with_extension(format!("partial-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .and_then(|mut file| file.write_all(bytes).and_then(|_| file.sync_all()))
        // `hard_link` fails when the target exists, unlike `rename`: a file made meanwhile
        // survives.
        .and_then(|_| std::fs::hard_link(&temporary, path));
    let _ = std::fs::remove_file(&temporary);
    written.map_err(failed)
}

/// A node or client certificate found by [`renew`], and what became of it.
#[derive(Debug, Serialize)]
pub struct Renewal {
    pub kind: &'static str,
    pub name: String,
    pub cert_file: PathBuf,
    /// Its expiry after the run (the new certificate's when renewed).
    pub not_after: String,
    pub renewed: bool,
}

/// Renews every node and client certificate in `dir` (`NAME.crt` with `NAME.key`, signed by
/// `dir/ca.*`) that expires within `within_days`, has expired, or does not go with its key: a
/// new key and a certificate with the same names, valid for `days` and checked as its users
/// will check it, in place of the old files (both written whole first, then the key renamed
/// over the old one, then the certificate: a run cut in between leaves a pair that does not
/// match, which nodes refuse to load, keeping their old one, and which the next run renews
/// again). A certificate the CA there did not sign, or a CA file that is not one certificate
/// going with `ca.key`, is an error naming it, before anything is replaced.
pub fn renew(dir: &Path, within_days: u32, days: u32) -> Result<Vec<Renewal>, CertsError> {
    let ca = read_ca(dir)?;
    let ca_invalid = |reason: String| CertsError::Invalid { what: dir.join("ca.crt").display().to_string(), reason };
    match crate::security::tls::certificates(ca.cert_pem.as_bytes()).map_err(ca_invalid)?.len() {
        1 => {}
        n => {
            return Err(ca_invalid(format!(
                "holds {n} certificates; renewing needs the one CA that ca.key goes with (rotate CAs by hand)"
            )));
        }
    }
    if !key_matches(&ca.cert_pem, &ca.key_pem).map_err(ca_invalid)? {
        return Err(ca_invalid("does not go with ca.key".into()));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| CertsError::Read { path: dir.to_path_buf(), source })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "crt") && path.file_stem().is_some_and(|s| s != "ca"))
        .collect();
    files.sort();
    let deadline = time::OffsetDateTime::now_utc().unix_timestamp() + i64::from(within_days) * 86_400;
    let mut found = Vec::new();
    for cert_file in files {
        let cert_pem = std::fs::read_to_string(&cert_file).map_err(|source| CertsError::Read { path: cert_file.clone(), source })?;
        let invalid = |reason: String| CertsError::Invalid { what: cert_file.display().to_string(), reason };
        let (kind, name, expires) = signed_leaf(&cert_pem, &ca.cert_pem).map_err(invalid)?;
        let key_file = cert_file.with_extension("key");
        let key_pem = std::fs::read_to_string(&key_file)
            .map_err(|e| invalid(format!("has no readable key beside it ({}: {e})", key_file.display())))?;
        let pair = key_matches(&cert_pem, &key_pem).map_err(|e| invalid(format!("{}: {e}", key_file.display())))?;
        found.push((cert_file, key_file, kind, name, expires, pair));
    }
    let mut report = Vec::new();
    for (cert_file, key_file, kind, name, expires, pair) in found {
        let label = if matches!(kind, Kind::Node { .. }) { "node" } else { "client" };
        let renewed = expires <= deadline || !pair;
        let not_after = if renewed {
            let issued = issue(&kind, &name, days, Some(&ca))?;
            valid_now(&issued.cert_pem, &ca.cert_pem)
                .map_err(|reason| CertsError::Invalid { what: format!("the new certificate of {name:?}"), reason })?;
            let (key_new, cert_new) = (staged(&key_file), staged(&cert_file));
            let _ = (std::fs::remove_file(&key_new), std::fs::remove_file(&cert_new));
            write_new(&key_new, issued.key_pem.as_bytes(), 0o600)?;
            write_new(&cert_new, issued.cert_pem.as_bytes(), 0o644)?;
            for (from, to) in [(&key_new, &key_file), (&cert_new, &cert_file)] {
                std::fs::rename(from, to).map_err(|source| CertsError::Write { path: to.clone(), source })?;
            }
            not_after(&issued.cert_pem)
        } else {
            not_after(&std::fs::read_to_string(&cert_file).unwrap_or_default())
        };
        report.push(Renewal { kind: label, name, cert_file, not_after, renewed });
    }
    Ok(report)
}

/// What leaf certificate `cert_pem` was issued as (its kind with its hosts, its name) and its
/// expiry, when the CA `ca_pem` signed it.
fn signed_leaf(cert_pem: &str, ca_pem: &str) -> Result<(Kind, String, i64), String> {
    use x509_parser::extensions::GeneralName;
    let der = crate::security::tls::certificates(cert_pem.as_bytes())?.remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| format!("not a certificate: {e}"))?;
    let name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
    let name = name.ok_or("has no common name")?;
    // Checked when it was valid (an expired certificate is one to renew).
    let roots = crate::security::tls::root_store(ca_pem.as_bytes()).map_err(|e| format!("ca.crt: {e}"))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, crate::security::tls::provider())
        .build()
        .map_err(|e| format!("ca.crt: {e}"))?;
    let valid_at = rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(cert.validity().not_before.timestamp() + 1).unwrap_or(0),
    ));
    verifier.verify_client_cert(&der, &[], valid_at).map_err(|e| format!("not a certificate the CA beside it signed ({e})"))?;
    let server = cert.extended_key_usage().ok().flatten().is_some_and(|eku| eku.value.server_auth);
    let kind = if server {
        let sans = match cert.subject_alternative_name() {
            Ok(Some(san)) => san.value.general_names.clone(),
            _ => Vec::new(),
        };
        let hosts = sans
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(dns) if *dns != name => Some(dns.to_string()),
                GeneralName::IPAddress(bytes) => ip(bytes).map(|a| a.to_string()),
                _ => None,
            })
            .collect();
        Kind::Node { hosts }
    } else {
        Kind::Client
    };
    Ok((kind, name, cert.validity().not_after.timestamp()))
}

fn ip(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// Where the renewed `path` is written before it is renamed over `path`.
fn staged(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".renewed-{}", std::process::id()));
    path.with_file_name(name)
}

/// Whether PEM key `key_pem` is the key of the first certificate in `cert_pem`.
fn key_matches(cert_pem: &str, key_pem: &str) -> Result<bool, String> {
    use rcgen::PublicKeyData as _;
    let key = KeyPair::from_pem(key_pem).map_err(|e| format!("not a key this tool reads: {e}"))?;
    let der = crate::security::tls::certificates(cert_pem.as_bytes())?.remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| format!("not a certificate: {e}"))?;
    Ok(cert.public_key().raw == key.subject_public_key_info().as_slice())
}

/// Whether `cert_pem` passes, now, the check nodes and clients make of a certificate of the CA
/// `ca_pem` (an expired CA, or a CA file whose key is not `ca.key`, fails here).
fn valid_now(cert_pem: &str, ca_pem: &str) -> Result<(), String> {
    let der = crate::security::tls::certificates(cert_pem.as_bytes())?.remove(0);
    let roots = crate::security::tls::root_store(ca_pem.as_bytes())?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, crate::security::tls::provider())
        .build()
        .map_err(|e| e.to_string())?;
    verifier
        .verify_client_cert(&der, &[], rustls_pki_types::UnixTime::now())
        .map(|_| ())
        .map_err(|e| format!("does not verify against ca.crt: {e}"))
}

/// The DER bytes of the first certificate in PEM `bytes` (empty when there is none).
pub fn first_certificate_der(bytes: &[u8]) -> Vec<u8> {
    crate::security::tls::certificates(bytes).ok().and_then(|c| c.into_iter().next()).map(|c| c.to_vec()).unwrap_or_default()
}

/// The expiry of a PEM certificate, for reports.
pub fn not_after(cert_pem: &str) -> String {
    expiry(cert_pem).map(|t| t.to_string()).unwrap_or_default()
}

/// The expiry of a PEM certificate in seconds since the Unix epoch (`None`: no certificate
/// could be read), for whoever renews it.
pub fn not_after_unix(cert_pem: &str) -> Option<i64> {
    expiry(cert_pem).map(|t| t.timestamp())
}

fn expiry(cert_pem: &str) -> Option<x509_parser::time::ASN1Time> {
    let der = crate::security::tls::certificates(cert_pem.as_bytes()).ok()?.into_iter().next()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.validity().not_after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::identity::CertNames;

    #[test]
    fn given_a_ca_when_a_node_certificate_is_issued_then_it_names_the_node_and_its_hosts() {
        let ca = issue(&Kind::Ca, "test CA", 30, None).unwrap();
        let node = issue(&Kind::Node { hosts: vec!["127.0.0.2".into(), "node-1.example".into()] }, "node-1", 30, Some(&ca)).unwrap();
        let der = crate::security::tls::certificates(node.cert_pem.as_bytes()).unwrap();
        let names = CertNames::of(der[0].as_ref()).unwrap();
        assert_eq!(names.common_name.as_deref(), Some("node-1"));
        assert_eq!(names.dns, vec!["node-1".to_string(), "node-1.example".to_string()]);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let expires = not_after_unix(&node.cert_pem).unwrap();
        assert!((now + 29 * 86_400..now + 31 * 86_400).contains(&expires), "{expires} vs {now}");
        assert_eq!(not_after_unix("no certificate"), None);
    }

    #[test]
    fn given_a_client_certificate_then_it_has_no_dns_name_and_cannot_pass_for_a_member() {
        let ca = issue(&Kind::Ca, "test CA", 30, None).unwrap();
        let client = issue(&Kind::Client, "node-1", 30, Some(&ca)).unwrap();
        let der = crate::security::tls::certificates(client.cert_pem.as_bytes()).unwrap();
        assert!(CertNames::of(der[0].as_ref()).unwrap().dns.is_empty());
    }

    #[test]
    fn given_a_bad_host_then_the_error_names_it() {
        let ca = issue(&Kind::Ca, "test CA", 30, None).unwrap();
        let Err(e) = issue(&Kind::Node { hosts: vec!["not a host".into()] }, "node-1", 30, Some(&ca)) else { panic!("issued") };
        assert!(e.to_string().contains("\"not a host\" is not a DNS name"), "{e}");
    }

    #[test]
    fn given_certificates_near_their_end_when_renewing_then_they_get_new_keys_with_the_same_names_and_the_others_stay() {
        let dir = tempfile::tempdir().unwrap();
        let ca = issue(&Kind::Ca, "test CA", 3650, None).unwrap();
        write(dir.path(), "ca", &ca).unwrap();
        let hosts = vec!["10.0.0.1".to_string(), "node-1.example".to_string(), "::1".to_string()];
        let soon = issue(&Kind::Node { hosts: hosts.clone() }, "node-1", 10, Some(&ca)).unwrap();
        write(dir.path(), "node-1", &soon).unwrap();
        let admin = issue(&Kind::Client, "admin", 100, Some(&ca)).unwrap();
        write(dir.path(), "admin", &admin).unwrap();

        let report = renew(dir.path(), 30, 365).unwrap();
        let summary: Vec<_> = report.iter().map(|r| (r.kind, r.name.as_str(), r.renewed)).collect();
        assert_eq!(summary, vec![("client", "admin", false), ("node", "node-1", true)]);
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read("admin.key"), admin.key_pem);
        assert_ne!(read("node-1.key"), soon.key_pem);
        let (kind, name, expires) = signed_leaf(&read("node-1.crt"), &ca.cert_pem).unwrap();
        let Kind::Node { hosts: renewed_hosts } = kind else { panic!("{kind:?}") };
        assert_eq!((name.as_str(), renewed_hosts), ("node-1", hosts));
        assert!(expires > time::OffsetDateTime::now_utc().unix_timestamp() + 364 * 86_400);
        // The new pair goes together, and the CA signed it.
        KeyPair::from_pem(&read("node-1.key")).unwrap();
        let config = crate::config::TlsConfig {
            cert_file: dir.path().join("node-1.crt"),
            key_file: dir.path().join("node-1.key"),
            ca_file: dir.path().join("ca.crt"),
            reload_interval_ms: 1000,
        };
        crate::security::tls::Material::load(&config, "node-1").unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.path().join("node-1.key")).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("renewed-")));
    }

    #[test]
    fn given_a_certificate_of_another_ca_when_renewing_then_it_is_named_and_nothing_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let ca = issue(&Kind::Ca, "test CA", 3650, None).unwrap();
        write(dir.path(), "ca", &ca).unwrap();
        let soon = issue(&Kind::Client, "admin", 1, Some(&ca)).unwrap();
        write(dir.path(), "admin", &soon).unwrap();
        let other = issue(&Kind::Ca, "test CA", 3650, None).unwrap();
        write(dir.path(), "stranger", &issue(&Kind::Client, "stranger", 1, Some(&other)).unwrap()).unwrap();
        let Err(e) = renew(dir.path(), 30, 365) else { panic!("renewed") };
        assert!(e.to_string().contains("stranger.crt") && e.to_string().contains("not a certificate the CA beside it signed"), "{e}");
        assert_eq!(std::fs::read_to_string(dir.path().join("admin.key")).unwrap(), soon.key_pem);
    }

    #[test]
    fn given_a_pair_that_does_not_match_when_renewing_then_it_is_renewed_however_far_its_end_and_two_cas_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = issue(&Kind::Ca, "test CA", 3650, None).unwrap();
        write(dir.path(), "ca", &ca).unwrap();
        let far = issue(&Kind::Client, "admin", 300, Some(&ca)).unwrap();
        let other = issue(&Kind::Client, "admin", 300, Some(&ca)).unwrap();
        // A run cut between the key and the certificate: the new key beside the old certificate.
        write(dir.path(), "admin", &Issued { cert_pem: far.cert_pem.clone(), key_pem: other.key_pem }).unwrap();
        let report = renew(dir.path(), 30, 365).unwrap();
        assert!(report[0].renewed, "{report:?}");
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(key_matches(&read("admin.crt"), &read("admin.key")).unwrap());
        assert!(!renew(dir.path(), 30, 365).unwrap()[0].renewed, "a matching pair far from its end is kept");

        // A CA file holding two CAs (a rotation): which one signs is not for this tool to guess.
        let second = issue(&Kind::Ca, "next CA", 3650, None).unwrap();
        std::fs::write(dir.path().join("ca.crt"), format!("{}{}", ca.cert_pem, second.cert_pem)).unwrap();
        let Err(e) = renew(dir.path(), 400, 365) else { panic!("renewed with two CAs") };
        assert!(e.to_string().contains("holds 2 certificates"), "{e}");
        // A CA certificate that does not go with ca.key.
        std::fs::write(dir.path().join("ca.crt"), &second.cert_pem).unwrap();
        let Err(e) = renew(dir.path(), 400, 365) else { panic!("renewed with another CA's key") };
        assert!(e.to_string().contains("does not go with ca.key"), "{e}");
    }

    #[test]
    fn given_existing_files_when_writing_then_nothing_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ca = issue(&Kind::Ca, "test CA", 30, None).unwrap();
        write(dir.path(), "ca", &ca).unwrap();
        let other = issue(&Kind::Ca, "other CA", 30, None).unwrap();
        let Err(CertsError::Exists { .. }) = write(dir.path(), "ca", &other) else { panic!("overwrote the CA") };
        assert_eq!(read_ca(dir.path()).unwrap().key_pem, ca.key_pem);
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
    }
}
