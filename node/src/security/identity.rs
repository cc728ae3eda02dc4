//! Who is calling: the names in a connection's verified certificate, and the gates every call
//! passes before a service sees it.
//!
//! - [`ClientGate`] (client services): a call must come with a certificate that chained to the
//!   cluster CA (the TLS handshake checked the chain; this checks one was presented) and names
//!   someone, else `UNAUTHENTICATED` naming what is missing. The caller is put in the request's
//!   extensions as a [`Principal`] for authorization.
//! - [`PeerGate`] (the `Cluster` service, node to node): the certificate must name a member of
//!   the cluster as a DNS subject alternative name, else `PERMISSION_DENIED`; the member is put
//!   in the extensions as a [`Peer`] so the service can refuse messages claiming to come from
//!   another member.
//!
//! Without TLS both gates let everything through (there is nothing to check a caller against);
//! docs/security.md says what that exposes.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::metrics::Metrics;

/// The names one certificate carries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertNames {
    /// The subject's common name (CN), when it has one.
    pub common_name: Option<String>,
    /// Its DNS subject alternative names.
    pub dns: Vec<String>,
}

impl CertNames {
    /// The names in DER certificate `der`; `None` when it does not parse.
    pub fn of(der: &[u8]) -> Option<CertNames> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let common_name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
        let dns = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(name) => Some(name.to_string()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Some(CertNames { common_name, dns })
    }

    /// Whether `name` is one of its DNS names (DNS names compare without regard to case).
    pub fn names_dns(&self, name: &str) -> bool {
        self.dns.iter().any(|d| d.eq_ignore_ascii_case(name))
    }

    /// The name a client certificate stands for: its common name, else its first DNS name.
    pub fn principal(&self) -> Option<&str> {
        self.common_name.as_deref().filter(|n| !n.is_empty()).or(self.dns.first().map(String::as_str))
    }
}

/// The caller of a client call, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The node runs without TLS: nobody is authenticated, and nothing is refused.
    Anonymous,
    /// A client certificate's name ([`CertNames::principal`]).
    Certificate(String),
}

/// The member a `Cluster` call comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its member id (Raft id and replication node id).
    pub id: u64,
}

/// The names in the certificate the caller presented, when it presented one.
fn presented_names<T>(request: &Request<T>) -> Option<CertNames> {
    let certs = request.peer_certs()?;
    certs.first().and_then(|leaf| CertNames::of(leaf.as_ref()))
}

/// The gate of the client services (module doc).
#[derive(Clone)]
pub struct ClientGate {
    tls: bool,
    metrics: Arc<Metrics>,
}

impl ClientGate {
    pub fn new(tls: bool, metrics: Arc<Metrics>) -> Self {
        ClientGate { tls, metrics }
    }
}

impl Interceptor for ClientGate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if !self.tls {
            request.extensions_mut().insert(Principal::Anonymous);
            return Ok(request);
        }
        let Some(names) = presented_names(&request) else {
            self.metrics.requests_refused.get_or_create(&vec![("reason", "unauthenticated")]).inc();
            return Err(Status::unauthenticated("this node requires a client certificate signed by the cluster CA"));
        };
        let Some(name) = names.principal() else {
            self.metrics.requests_refused.get_or_create(&vec![("reason", "unauthenticated")]).inc();
            return Err(Status::unauthenticated("the client certificate names nobody (no common name, no DNS name)"));
        };
        let principal = Principal::Certificate(name.to_string());
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// The gate of the `Cluster` service (module doc).
#[derive(Clone)]
pub struct PeerGate {
    tls: bool,
    /// Member names and their ids.
    members: Arc<BTreeMap<String, u64>>,
    metrics: Arc<Metrics>,
}

impl PeerGate {
    pub fn new(tls: bool, members: BTreeMap<String, u64>, metrics: Arc<Metrics>) -> Self {
        PeerGate { tls, members: Arc::new(members), metrics }
    }

    /// The member `names` stands for: the one member whose name is among its DNS names, when
    /// there is exactly one (a certificate naming two members is nobody's).
    fn member(&self, names: &CertNames) -> Option<u64> {
        let mut named = self.members.iter().filter(|(name, _)| names.names_dns(name));
        match (named.next(), named.next()) {
            (Some((_, id)), None) => Some(*id),
            _ => None,
        }
    }
}

impl Interceptor for PeerGate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if !self.tls {
            return Ok(request);
        }
        let names = presented_names(&request);
        let Some(id) = names.as_ref().and_then(|n| self.member(n)) else {
            self.metrics.requests_refused.get_or_create(&vec![("reason", "not_a_member")]).inc();
            let who = names.map_or("no certificate".to_string(), |n| format!("a certificate naming {:?} {:?}", n.common_name, n.dns));
            tracing::warn!(caller = %who, "refused a cluster call from someone who is not a member");
            return Err(Status::permission_denied(format!(
                "only members of the cluster may call the Cluster service; the caller presented {who}, which names no member, or several"
            )));
        };
        request.extensions_mut().insert(Peer { id });
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_certificate_with_a_common_name_and_dns_names_then_both_are_read() {
        let mut params = rcgen::CertificateParams::new(vec!["node-1".to_string(), "node-1.example".to_string()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "node-1");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let names = CertNames::of(cert.der()).unwrap();
        assert_eq!(names.common_name.as_deref(), Some("node-1"));
        assert_eq!(names.dns, vec!["node-1".to_string(), "node-1.example".to_string()]);
        assert_eq!(names.principal(), Some("node-1"));
    }

    #[test]
    fn given_a_certificate_naming_two_members_then_it_is_no_member() {
        let members = BTreeMap::from([("node-1".to_string(), 1), ("node-2".to_string(), 2)]);
        let gate = PeerGate::new(true, members, Arc::new(Metrics::default()));
        let names = |dns: &[&str]| CertNames { common_name: None, dns: dns.iter().map(|d| d.to_string()).collect() };
        assert_eq!(gate.member(&names(&["node-2", "node-2.example"])), Some(2));
        assert_eq!(gate.member(&names(&["NODE-2"])), Some(2), "DNS names compare without regard to case");
        assert_eq!(gate.member(&names(&["node-1", "node-2"])), None);
        assert_eq!(gate.member(&names(&["node-9"])), None);
    }

    #[test]
    fn given_bytes_that_are_no_certificate_then_no_names() {
        assert_eq!(CertNames::of(b"not a certificate"), None);
    }

    #[test]
    fn given_a_certificate_without_a_common_name_then_its_first_dns_name_is_the_principal() {
        let names = CertNames { common_name: None, dns: vec!["svc.example".into()] };
        assert_eq!(names.principal(), Some("svc.example"));
        assert_eq!(CertNames::default().principal(), None);
    }
}
