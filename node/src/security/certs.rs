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
