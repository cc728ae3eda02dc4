//! Who is calling: the names in a connection's verified certificate, and the gates every call
//! passes before a service sees it.
//!
//! - [`ClientGate`] (client services): a call must come with a certificate that chained to the
//!   cluster CA (the TLS handshake checked the chain; this checks one was presented) and names
//!   someone, or a valid bearer token, else `UNAUTHENTICATED` naming what is missing. The
//!   caller and its grants are put in the request's extensions as a [`Caller`] for the
//!   services' authorization checks ([`crate::security::auth`]).
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
use crate::security::audit::Audit;
use crate::security::auth::{Auth, Caller};

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

/// The gate of the client services (module doc). `auth` is `None` without TLS.
#[derive(Clone)]
pub struct ClientGate {
    auth: Option<Auth>,
    metrics: Arc<Metrics>,
    /// Calls per second per caller (0: no limit), and each caller's bucket.
    rate: u32,
    buckets: Arc<parking_lot::Mutex<std::collections::HashMap<String, Bucket>>>,
    /// Where callers' audit records go.
    audit: Option<Audit>,
}

/// A token bucket: up to a second's worth of calls at once, refilled at the rate.
struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

/// Callers whose buckets are kept; past it the full ones are dropped.
const MAX_BUCKETS: usize = 10_000;

impl ClientGate {
    pub fn new(auth: Option<Auth>, metrics: Arc<Metrics>) -> Self {
        ClientGate { auth, metrics, rate: 0, buckets: Arc::default(), audit: None }
    }

    /// Callers' audit records go to `audit`'s stream.
    pub fn with_audit(mut self, audit: Audit) -> Self {
        self.audit = Some(audit);
        self
    }

    /// Limits each caller to `calls_per_second` (0: no limit).
    pub fn with_rate(mut self, calls_per_second: u32) -> Self {
        self.rate = calls_per_second;
        self
    }

    /// Takes one call from `caller`'s bucket; `false` when it is empty.
    fn take(&self, caller: &str) -> bool {
        if self.rate == 0 {
            return true;
        }
        let rate = f64::from(self.rate);
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock();
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(caller) {
            // Full buckets are as good as absent ones: only those go (a throttled caller keeps
            // its empty bucket).
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < rate);
        }
        let bucket = buckets.entry(caller.to_string()).or_insert(Bucket { tokens: rate, at: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(rate);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return false;
        }
        bucket.tokens -= 1.0;
        true
    }

    fn refuse(&self, why: &str) -> Status {
        self.metrics.requests_refused.get_or_create(&vec![("reason", "unauthenticated")]).inc();
        Status::unauthenticated(why.to_string())
    }
}

impl Interceptor for ClientGate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(auth) = &self.auth else {
            request.extensions_mut().insert(Caller::anonymous().audited_by(self.audit.clone()));
            return Ok(request);
        };
        // A bearer token wins over the certificate (a shared client certificate may only get
        // a client through TLS).
        let bearer = request.metadata().get("authorization").map(|v| v.to_str().unwrap_or_default().to_string());
        let caller = match bearer {
            Some(value) => {
                let token = value.strip_prefix("Bearer ").unwrap_or_default().trim();
                auth.token_caller(token).ok_or_else(|| self.refuse("the bearer token is not valid (mistyped, or revoked)"))?
            }
            None => {
                let names = presented_names(&request)
                    .ok_or_else(|| self.refuse("this node requires a client certificate signed by the cluster CA, or a bearer token"))?;
                let name =
                    names.principal().ok_or_else(|| self.refuse("the client certificate names nobody (no common name, no DNS name)"))?;
                auth.certificate_caller(name)
            }
        };
        if !self.take(&caller.who()) {
            self.metrics.requests_refused.get_or_create(&vec![("reason", "rate_limited")]).inc();
            return Err(Status::resource_exhausted(format!(
                "{} started more than {} calls in a second (limits.calls_per_second_per_caller); slow down",
                caller.who(),
                self.rate
            )));
        }
        request.extensions_mut().insert(caller.audited_by(self.audit.clone()));
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
    fn given_a_rate_then_each_caller_gets_a_seconds_worth_of_calls_at_once_and_no_more() {
        let gate = ClientGate::new(None, Arc::new(Metrics::default())).with_rate(5);
        assert_eq!((0..10).filter(|_| gate.take("token a")).count(), 5);
        assert!(gate.take("token b"), "another caller has its own bucket");
        assert!((0..10).all(|_| ClientGate::new(None, Arc::new(Metrics::default())).take("anyone")), "0: no limit");
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
