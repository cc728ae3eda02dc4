//! TLS on the node's gRPC port, from the PEM files `tls` names, reloaded when they change.
//!
//! One port serves clients and peers. The server asks every connection for a certificate but
//! lets one without through the handshake: a client may come with a token instead, and
//! [`super::identity`] refuses a call that brings neither. A certificate that is offered must
//! chain to the cluster CA, or the handshake fails.
//!
//! Rotation: [`watch_files`] reads the files every `reload_interval_ms`; when their bytes
//! changed and they make a valid configuration, new connections use it. Open connections keep
//! the one they were made with (a TLS session authenticated at its handshake stays so), so a
//! rotation drops no replication stream and no in-flight call. Files that do not load (a half
//! written key, a certificate not matching its key) leave the previous configuration in force,
//! and the node says why in its log until they do.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use super::connections::{Counted, PerAddress};
use crate::config::TlsConfig;
use crate::coordination::transport::until_stopped;
use crate::metrics::Metrics;

/// Longest a connection may take to finish its TLS handshake before it is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once; a connection accepted while this many are is closed at once
/// (accepting never waits: a crowd of idle sockets cannot keep peers out).
const MAX_HANDSHAKES: usize = 512;
/// TLS handshakes of one remote address in progress at once; more are closed at once.
const MAX_HANDSHAKES_PER_ADDRESS: usize = 128;
/// Handshaken connections waiting for the gRPC server to take them.
const ACCEPTED_QUEUE: usize = 64;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {field} {path}: {source}")]
    Read { field: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{field} {path}: {reason}")]
    Invalid { field: &'static str, path: PathBuf, reason: String },
}

/// The PEM bytes of the three files and the configurations made from them.
pub struct Material {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
    /// What the server side of the port uses.
    pub server: Arc<rustls::ServerConfig>,
}

impl Material {
    /// Reads and checks the files of `config` for the node named `node_id`: the certificate
    /// must match its key, chain to the CA, name the node, and allow client authentication.
    pub fn load(config: &TlsConfig, node_id: &str) -> Result<Material, TlsError> {
        let cert_pem = read(&config.cert_file, "tls.cert_file")?;
        let key_pem = read(&config.key_file, "tls.key_file")?;
        let ca_pem = read(&config.ca_file, "tls.ca_file")?;
        Material::from_pem(config, node_id, cert_pem, key_pem, ca_pem)
    }

    fn from_pem(config: &TlsConfig, node_id: &str, cert_pem: Vec<u8>, key_pem: Vec<u8>, ca_pem: Vec<u8>) -> Result<Material, TlsError> {
        let invalid = |field, path: &Path, reason: String| TlsError::Invalid { field, path: path.to_path_buf(), reason };
        let chain = certificates(&cert_pem).map_err(|r| invalid("tls.cert_file", &config.cert_file, r))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| invalid("tls.key_file", &config.key_file, format!("no PEM private key in it ({e})")))?;
        let roots = root_store(&ca_pem).map_err(|r| invalid("tls.ca_file", &config.ca_file, r))?;
        let provider = provider();
        let not_for_node = |reason: String| invalid("tls.cert_file", &config.cert_file, reason);
        // The node's own certificate must pass the checks its peers make of it, as a server
        // (named `node_id`) and as a client: a mistake shows at start, not at every peer.
        let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| invalid("tls.ca_file", &config.ca_file, e.to_string()))?;
        let name = ServerName::try_from(node_id.to_string()).map_err(|e| not_for_node(format!("node_id {node_id:?}: {e}")))?;
        let now = UnixTime::now();
        server_verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], now)
            .map_err(|e| not_for_node(format!("not a valid server certificate for {node_id:?} signed by tls.ca_file: {e}")))?;
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| invalid("tls.ca_file", &config.ca_file, e.to_string()))?;
        client_verifier
            .verify_client_cert(&chain[0], &chain[1..], now)
            .map_err(|e| not_for_node(format!("not usable as a client certificate towards peers: {e}")))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| not_for_node(e.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain, key)
            .map_err(|e| invalid("tls.key_file", &config.key_file, format!("does not go with tls.cert_file: {e}")))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Material { cert_pem, key_pem, ca_pem, server: Arc::new(server) })
    }

    /// The client side of a connection to the member named `peer`: this node's certificate as
    /// its identity, the CA, and `peer` as the name the peer's certificate must carry (whatever
    /// address it is reached at).
    pub fn client_to(&self, peer: &str) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(peer)
    }

    /// What a node makes of its files at start: [`Material::load`], and a certificate naming no
    /// other member (the check the operator's certificates are tested against).
    pub fn check(config: &TlsConfig, node_id: &str, members: &[String]) -> Result<Material, TlsError> {
        let material = Material::load(config, node_id)?;
        material.names_no_other_member(config, node_id, members)?;
        Ok(material)
    }

    /// A certificate naming two members would let its holder speak as either to their peers,
    /// and make the peers take the real one for an impostor: refused.
    fn names_no_other_member(&self, config: &TlsConfig, node_id: &str, members: &[String]) -> Result<(), TlsError> {
        let leaf = certificates(&self.cert_pem).ok().and_then(|c| c.into_iter().next());
        let names = leaf.and_then(|der| super::identity::CertNames::of(der.as_ref())).unwrap_or_default();
        let others: Vec<&String> = members.iter().filter(|m| *m != node_id && names.names_dns(m)).collect();
        if others.is_empty() {
            return Ok(());
        }
        Err(TlsError::Invalid {
            field: "tls.cert_file",
            path: config.cert_file.clone(),
            reason: format!("names other members too ({others:?}): each node needs a certificate naming it alone among the members"),
        })
    }

    /// Puts the certificate's expiry in `tls_certificate_expiry_seconds`.
    fn report_expiry(&self, metrics: &Metrics) {
        let pem = String::from_utf8_lossy(&self.cert_pem);
        metrics.tls_certificate_expiry_seconds.set(super::certs::not_after_unix(&pem).unwrap_or(0));
    }

    fn same_files(&self, cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) -> bool {
        self.cert_pem == cert_pem && self.key_pem == key_pem && self.ca_pem == ca_pem
    }
}

/// The crypto every TLS configuration of the node uses (ring, as tonic's).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates in PEM `bytes`, at least one.
pub fn certificates(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(bytes).collect::<Result<_, _>>().map_err(|e| format!("bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

/// The trust roots in PEM `bytes`, at least one.
pub fn root_store(bytes: &[u8]) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(bytes)? {
        roots.add(cert).map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    Ok(Arc::new(roots))
}

fn read(path: &Path, field: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { field, path: path.to_path_buf(), source })
}

async fn read_async(path: &Path, field: &'static str) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(path).await.map_err(|source| TlsError::Read { field, path: path.to_path_buf(), source })
}

/// The node's TLS configuration as of now; [`watch_files`] replaces it when the files change.
#[derive(Clone)]
pub struct Tls {
    current: watch::Receiver<Arc<Material>>,
}

impl Tls {
    /// Loads the files (an error names the file and what is wrong with it) and starts watching
    /// them until `stopped`. `members` are the cluster's member names: the node's certificate
    /// may name no member but itself.
    pub fn start(
        config: &TlsConfig,
        node_id: &str,
        members: &[String],
        metrics: Arc<Metrics>,
        stopped: watch::Receiver<bool>,
    ) -> Result<Tls, TlsError> {
        let material = Material::check(config, node_id, members)?;
        material.report_expiry(&metrics);
        let (tx, current) = watch::channel(Arc::new(material));
        tokio::spawn(watch_files(config.clone(), node_id.to_string(), members.to_vec(), tx, metrics, stopped));
        Ok(Tls { current })
    }

    pub fn current(&self) -> Arc<Material> {
        self.current.borrow().clone()
    }
}

/// Reads the files every `reload_interval_ms`; new bytes that load replace the configuration.
async fn watch_files(
    config: TlsConfig,
    node_id: String,
    members: Vec<String>,
    current: watch::Sender<Arc<Material>>,
    metrics: Arc<Metrics>,
    mut stopped: watch::Receiver<bool>,
) {
    let interval = Duration::from_millis(config.reload_interval_ms);
    // The bytes of the last failed attempt: the same failure is logged once, not every tick.
    let mut failed: Option<(Vec<u8>, Vec<u8>, Vec<u8>)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = until_stopped(&mut stopped) => return,
        }
        let files = (
            read_async(&config.cert_file, "tls.cert_file").await,
            read_async(&config.key_file, "tls.key_file").await,
            read_async(&config.ca_file, "tls.ca_file").await,
        );
        let (cert, key, ca) = match files {
            (Ok(cert), Ok(key), Ok(ca)) => (cert, key, ca),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                // A file being replaced (a Kubernetes Secret's symlink swap) can be missing for
                // an instant; the next tick reads it again.
                tracing::debug!(error = %e, "cannot read a TLS file; keeping the current configuration");
                continue;
            }
        };
        if current.borrow().same_files(&cert, &key, &ca) {
            failed = None;
            continue;
        }
        // Files that failed are tried again every tick (a certificate not valid yet becomes
        // valid), but their failure is logged once.
        let failed_before = failed.as_ref().is_some_and(|f| (&f.0, &f.1, &f.2) == (&cert, &key, &ca));
        let loaded = Material::from_pem(&config, &node_id, cert.clone(), key.clone(), ca.clone())
            .and_then(|m| m.names_no_other_member(&config, &node_id, &members).map(|()| m));
        match loaded {
            Ok(material) => {
                failed = None;
                material.report_expiry(&metrics);
                current.send_replace(Arc::new(material));
                metrics.tls_reloads.inc();
                tracing::info!(cert_file = %config.cert_file.display(), "TLS files changed: new connections use the new certificate, key and CA");
            }
            Err(_) if failed_before => {}
            Err(e) => {
                failed = Some((cert, key, ca));
                metrics.tls_reload_failures.inc();
                tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous configuration until they do");
            }
        }
    }
}

/// Connections accepted on `listener` once their TLS handshake is done, each with the
/// configuration current when it was accepted. Handshakes run concurrently (at most
/// [`MAX_HANDSHAKES`]), each for at most [`HANDSHAKE_TIMEOUT`]; a failed one is counted and
/// logged, and never reaches the gRPC server.
pub fn incoming(
    listener: TcpListener,
    tls: Tls,
    limits: Arc<PerAddress>,
    metrics: Arc<Metrics>,
    mut stopped: watch::Receiver<bool>,
) -> ReceiverStream<std::io::Result<Counted<TlsStream<TcpStream>>>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        // One address cannot hold every handshake slot (and have the others' connections closed).
        let handshaking = PerAddress::new(MAX_HANDSHAKES_PER_ADDRESS, metrics.clone());
        loop {
            let accepted = tokio::select! {
                accepted = super::connections::accept(&listener, &limits, &mut stopped) => accepted,
                _ = tx.closed() => return,
            };
            let Some((tcp, place)) = accepted else { return };
            let Ok(remote) = tcp.peer_addr() else { continue };
            let Some(handshake_place) = handshaking.admit(remote.ip()) else { continue };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                metrics.tls_handshake_failures.inc();
                tracing::debug!(%remote, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current().server.clone());
            let (tx, metrics) = (tx.clone(), metrics.clone());
            tokio::spawn(async move {
                let _permits = (permit, handshake_place);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(Counted::new(stream, place))).await;
                    }
                    Ok(Err(e)) => {
                        metrics.tls_handshake_failures.inc();
                        tracing::debug!(%remote, error = %e, "TLS handshake failed; connection closed");
                    }
                    Err(_) => {
                        metrics.tls_handshake_failures.inc();
                        tracing::debug!(%remote, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake took too long; connection closed");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
