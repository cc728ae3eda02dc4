//! TLS end to end, with real `anthill` processes on loopback and certificates from
//! `anthill certs`' CA code: a 3-node cluster with TLS on forms and replicates; clients without
//! a certificate, with one of another CA, or in plain text are refused; a node whose
//! certificate comes from another CA neither joins nor receives replication; a certificate of
//! the right CA that names no member, or a member's certificate sending another member's
//! messages, is refused by the `Cluster` service; and every node's certificate is rotated
//! under a quorum load without losing an acknowledged write.
//!
//! The process's clients use TLS as `admin` once a cluster is configured (`client::use_tls`),
//! so every test of this file uses TLS.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anthill_node::client;
use anthill_node::local::{ClusterSpec, LocalCluster, ensure_certificate};
use anthill_node::router::Router;
use anthill_node::security::certs::{self, Kind};
use anthill_proto::v1 as pb;
use tokio_stream::StreamExt as _;

const NODES: usize = 3;
const PARTITIONS: u32 = 4;

/// One cluster at a time on two cores (a starved node would fail over for no reason).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn spec() -> ClusterSpec {
    ClusterSpec { tls: true, ..ClusterSpec::embedded(NODES, PARTITIONS, 3, 2_000) }
}

fn append(stream: &str, payload: String) -> pb::AppendRequest {
    pb::AppendRequest {
        durability: pb::Durability::Quorum as i32,
        stream: stream.into(),
        expected_version: None,
        events: vec![common::event("Marked", &payload)],
    }
}

#[test]
fn no_openssl_is_built_into_anything_of_the_workspace() {
    // rustls everywhere (issue 11): neither OpenSSL's bindings nor native-tls are in the build.
    // (`openssl-probe` only finds the system's CA bundle, for rustls-native-certs.)
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock")).unwrap();
    let packages: Vec<&str> = lock.lines().filter_map(|l| l.strip_prefix("name = \"")?.strip_suffix('"')).collect();
    assert!(packages.contains(&"rustls"), "the lock file lists its packages");
    for banned in ["openssl", "openssl-sys", "native-tls"] {
        assert!(!packages.contains(&banned), "{banned} is in Cargo.lock");
    }
}

/// The value of metric `name` (summed over its label sets) on node `i`.
async fn metric(cluster: &LocalCluster, i: usize, name: &str) -> u64 {
    let addr = cluster.nodes[i].as_ref().and_then(|n| n.metrics_addr).expect("a running node with metrics");
    common::metric_sum(&http_get(addr, "/metrics").await, name)
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

/// A client of node `i` that shows `identity` (a certificate stem under `certs`, or none) and
/// trusts `ca` (a CA certificate file).
async fn raw_client(url: &str, ca: &Path, identity: Option<(&Path, &str)>) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let mut tls =
        tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((dir, stem)) = identity {
        let cert = std::fs::read(dir.join(format!("{stem}.crt"))).unwrap();
        let key = std::fs::read(dir.join(format!("{stem}.key"))).unwrap();
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().tls_config(tls).unwrap().connect().await
}

/// The leaf certificate the node at `addr` serves to a new connection.
async fn served_certificate(addr: std::net::SocketAddr, ca: &Path) -> Vec<u8> {
    let roots = anthill_node::security::tls::root_store(&std::fs::read(ca).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(anthill_node::security::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_rate_per_caller_then_a_caller_past_it_gets_resource_exhausted_and_another_caller_does_not() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let node_args = vec!["--calls-per-second-per-caller".to_string(), "20".to_string()];
    let spec = ClusterSpec { tls: true, node_args, ..ClusterSpec::embedded(1, 1, 1, 2_000) };
    let cluster = LocalCluster::start(&common::exe(), dir.path(), &spec).unwrap();
    cluster.wait_whole(&spec, Duration::from_secs(60)).await.unwrap();
    let certs = dir.path().join("certs");
    ensure_certificate(&certs, &Kind::Client, "alice").unwrap();
    let mut admin = client::connect(&cluster.url(0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let grants = vec![pb::Grant { role: "read".into(), tenant: "acme".into() }];
    admin.auth.set_grants(pb::SetGrantsRequest { principal: "alice".into(), grants }).await.unwrap();
    // A full bucket (20 calls), then a burst of 80 at once: the caller gets about 20, then
    // refusals.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let started = Instant::now();
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..80 {
        let mut node = admin.node.clone();
        burst.spawn(async move { node.status(pb::StatusRequest {}).await });
    }
    let (mut served, mut refused) = (0, 0);
    while let Some(outcome) = burst.join_next().await {
        match outcome.unwrap() {
            Ok(_) => served += 1,
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
                assert!(
                    s.message()
                        .contains("certificate \"admin\" started more than 20 calls in a second (limits.calls_per_second_per_caller)"),
                    "{s:?}"
                );
                refused += 1;
            }
        }
    }
    let refill = (started.elapsed().as_secs_f64() * 20.0).ceil() as u32;
    assert!(refused > 0 && served >= 20 && served <= 20 + refill, "{served} served, {refused} refused in {:?}", started.elapsed());
    // Another caller has a bucket of its own.
    let alice = raw_client(&cluster.url(0), &certs.join("ca.crt"), Some((&certs, "alice"))).await.unwrap();
    let read = pb::ReadRequest { stream: "acme/orders".into(), from_version: 1, max_count: 10, linearizable: false };
    let alices = pb::event_log_client::EventLogClient::new(alice).read(read).await;
    assert!(alices.as_ref().is_ok_and(|r| r.get_ref().events.is_empty()), "{alices:?}");
    assert!(metric(&cluster, 0, "anthill_requests_refused_total{reason=\"rate_limited\"}").await >= refused);
    // A second later the first is served again.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    admin.node.status(pb::StatusRequest {}).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_tls_on_then_the_cluster_serves_members_and_admin_and_refuses_everyone_else() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let cluster = LocalCluster::start(&common::exe(), dir.path(), &spec).unwrap();
    cluster.wait_whole(&spec, Duration::from_secs(60)).await.unwrap();
    let router = Router::connect(&cluster.urls()).await.unwrap();
    let written = router.append(append("orders-1", "first".into())).await.unwrap();
    assert_eq!(written.first_position, written.last_position);

    let certs = dir.path().join("certs");
    let url = cluster.url(0);
    // Plain text to a TLS port: no answer.
    let plain = format!("http://{}", cluster.addrs[0]);
    let plain_status = async {
        let channel = tonic::transport::Endpoint::from_shared(plain).unwrap().connect().await?;
        Ok::<_, tonic::transport::Error>(pb::node_client::NodeClient::new(channel).status(pb::StatusRequest {}).await)
    };
    assert!(!matches!(plain_status.await, Ok(Ok(_))), "a plain-text client got a status from a TLS node");

    // TLS without a certificate: the handshake passes, the call is refused.
    let channel = raw_client(&url, &certs.join("ca.crt"), None).await.unwrap();
    let status = pb::event_log_client::EventLogClient::new(channel).append(append("orders-1", "anonymous".into())).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("client certificate"), "{status:?}");

    // A certificate of another CA: the node's TLS refuses it in the handshake, before any
    // service (whose refusal would be a gRPC status) sees the call, and counts the failure.
    let other = dir.path().join("other");
    ensure_certificate(&other, &Kind::Ca, "ca").unwrap();
    ensure_certificate(&other, &Kind::Client, "mallory").unwrap();
    let failures_before = metric(&cluster, 0, "anthill_tls_handshake_failures_total").await;
    let outcome = match raw_client(&url, &certs.join("ca.crt"), Some((&other, "mallory"))).await {
        Err(e) => format!("{e:?}"),
        Ok(channel) => match pb::node_client::NodeClient::new(channel).status(pb::StatusRequest {}).await {
            Ok(_) => panic!("a client with another CA's certificate was served"),
            Err(s) => {
                assert!(
                    !matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied),
                    "another CA's certificate got past the handshake to the gate: {s:?}"
                );
                format!("{s:?}")
            }
        },
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&cluster, 0, "anthill_tls_handshake_failures_total").await < failures_before + 1 {
        assert!(Instant::now() < deadline, "the node counted no failed handshake for another CA's certificate ({outcome})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A node dialing a peer checks the certificate names that peer, whatever the address: as
    // node-2 (its own files, as its peer connections are made), node-1's address is node-1's
    // and nobody else's.
    let node_2 = anthill_node::config::TlsConfig {
        cert_file: certs.join("node-2.crt"),
        key_file: certs.join("node-2.key"),
        ca_file: certs.join("ca.crt"),
        reload_interval_ms: anthill_node::config::TlsConfig::DEFAULT_RELOAD_INTERVAL_MS,
    };
    let node_2 = anthill_node::security::tls::Material::load(&node_2, "node-2").unwrap();
    // Past the handshake, the call reaches the node's gate (which gives a member no client
    // grant: PERMISSION_DENIED); refused in it, it never does.
    let reaches_the_gate = |peer: &str| {
        let endpoint = tonic::transport::Endpoint::from_shared(url.clone()).unwrap().tls_config(node_2.client_to(peer)).unwrap();
        async move {
            let Ok(channel) = endpoint.connect().await else { return false };
            let status = pb::node_client::NodeClient::new(channel).status(pb::StatusRequest {}).await;
            matches!(status.map_err(|s| s.code()), Ok(_) | Err(tonic::Code::PermissionDenied))
        }
    };
    assert!(!reaches_the_gate("node-3").await, "node-1's certificate was taken for node-3's");
    assert!(reaches_the_gate("node-1").await, "node-2 could not reach node-1 as node-1");

    // Files that do not load (node-2's certificate beside node-1's key) leave the ones in force.
    let in_force = served_certificate(cluster.addrs[0], &certs.join("ca.crt")).await;
    let node_1_crt = std::fs::read(certs.join("node-1.crt")).unwrap();
    let failures_before = metric(&cluster, 0, "anthill_tls_reload_failures_total").await;
    std::fs::copy(certs.join("node-2.crt"), certs.join("node-1.crt")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&cluster, 0, "anthill_tls_reload_failures_total").await < failures_before + 1 {
        assert!(Instant::now() < deadline, "node-1 never noticed its certificate file changed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served_certificate(cluster.addrs[0], &certs.join("ca.crt")).await, in_force);
    assert_eq!(metric(&cluster, 0, "anthill_tls_reloads_total").await, 0);
    std::fs::write(certs.join("node-1.crt"), node_1_crt).unwrap();

    // The right CA, but no member's name: the Cluster service refuses it.
    ensure_certificate(&certs, &Kind::Node { hosts: vec![] }, "node-9").unwrap();
    let channel = raw_client(&url, &certs.join("ca.crt"), Some((&certs, "node-9"))).await.unwrap();
    let envelope = pb::ReplicaEnvelope { partition: 0, from: 9, message: None };
    let status = pb::cluster_client::ClusterClient::new(channel).replicate(tokio_stream::iter(vec![envelope])).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // A member's certificate with messages in another member's name: refused.
    let channel = raw_client(&url, &certs.join("ca.crt"), Some((&certs, "node-2"))).await.unwrap();
    let envelope = pb::ReplicaEnvelope { partition: 0, from: 3, message: None };
    let status = pb::cluster_client::ClusterClient::new(channel).replicate(tokio_stream::iter(vec![envelope])).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("claim to come from member 3"), "{status:?}");

    // `--tls-server-name`: the CLI checks the certificate against that name instead of the
    // address it dials (node-1's certificate names its address, so the refusal below comes
    // from the name alone).
    let cli = |extra: &[&str]| {
        let out = std::process::Command::new(common::exe())
            .arg("--tls-ca")
            .arg(certs.join("ca.crt"))
            .arg("--tls-cert")
            .arg(certs.join("admin.crt"))
            .arg("--tls-key")
            .arg(certs.join("admin.key"))
            .args(extra)
            .args(["status", "--json", "--server", &url])
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (served, said) = cli(&["--tls-server-name", "node-1"]);
    assert!(served && said.contains("\"node_id\": \"node-1\""), "{said}");
    let (served, said) = cli(&["--tls-server-name", "node-2"]);
    assert!(!served && said.starts_with("anthill: "), "node-1 passed for node-2: {said}");
    let (served, said) = cli(&["--tls-server-name", "not a name"]);
    assert!(!served && said.contains("--tls-server-name \"not a name\" is not a DNS name"), "{said}");

    // Nothing of the refused calls was written, and the refusals were counted.
    let read = router.read(pb::ReadRequest { stream: "orders-1".into(), from_version: 1, max_count: 10, linearizable: false }).await;
    assert_eq!(read.unwrap().events.len(), 1);
    assert!(metric(&cluster, 0, "anthill_requests_refused_total").await >= 2);
    assert!(metric(&cluster, 0, "anthill_tls_handshake_failures_total").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_member_with_a_certificate_of_another_ca_then_it_neither_joins_nor_receives_replication() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // Replication factor 2: placements are written once that many members are live (nodes 1
    // and 2), and node-3 never is.
    let spec = ClusterSpec { replication_factor: 2, ..spec() };
    let mut cluster = LocalCluster::configure(&common::exe(), dir.path(), &spec).unwrap();
    // node-3's files: a CA of its own, and a certificate from it with the right name.
    let certs = dir.path().join("certs");
    let other = dir.path().join("other");
    ensure_certificate(&other, &Kind::Ca, "ca").unwrap();
    ensure_certificate(&other, &Kind::Node { hosts: vec![cluster.addrs[2].ip().to_string()] }, "node-3").unwrap();
    for file in ["node-3.crt", "node-3.key"] {
        std::fs::copy(other.join(file), certs.join(file)).unwrap();
    }
    let config = dir.path().join("node-3.yaml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&certs.join("ca.crt").display().to_string(), &other.join("ca.crt").display().to_string());
    std::fs::write(&config, text).unwrap();
    for i in 0..NODES {
        cluster.start_node(i, &[]).unwrap();
    }

    // Nodes 1 and 2 serve every partition and never see node-3.
    let router = Router::connect(&cluster.urls()[..2]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut acked = 0;
    while acked < 20 {
        match router.append(append(&format!("orders-{acked}"), format!("event {acked}"))).await {
            Ok(_) => acked += 1,
            Err(e) => {
                let log = std::fs::read_to_string(dir.path().join("node-1.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                assert!(
                    Instant::now() < deadline,
                    "nodes 1 and 2 did not take quorum appends without node-3: {e:?}; node-1's log ends {tail:#?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let mut c = client::connect(&cluster.url(0)).await.unwrap();
    let view = c.node.status(pb::StatusRequest {}).await.unwrap().into_inner().cluster.unwrap();
    let node_3 = view.members.iter().find(|m| m.name == "node-3").expect("node-3 is a configured member");
    assert!(!node_3.live, "node-3 joined with a certificate of another CA: {view:?}");
    assert!(metric(&cluster, 0, "anthill_tls_handshake_failures_total").await >= 1);

    // node-3 holds none of the events.
    cluster.terminate(2, Duration::from_secs(20)).unwrap();
    let storage = anthill_node::config::StorageConfig { partitions: PARTITIONS, ..Default::default() };
    let store = anthill_node::storage::Store::open(&dir.path().join("node-3"), &storage).unwrap();
    assert_eq!(store.partition_heads().iter().sum::<u64>(), 0, "node-3 received replication");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_quorum_load_when_every_nodes_certificate_is_rotated_then_no_acknowledged_write_is_lost() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let mut cluster = LocalCluster::start(&common::exe(), dir.path(), &spec).unwrap();
    cluster.wait_whole(&spec, Duration::from_secs(60)).await.unwrap();
    let certs = dir.path().join("certs");
    let fingerprint = |i: usize| std::fs::read(certs.join(format!("{}.crt", LocalCluster::name(i)))).unwrap();
    let before: Vec<Vec<u8>> = (0..NODES).map(fingerprint).collect();

    let router = Arc::new(Router::connect(&cluster.urls()).await.unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Four writers, each on a stream of its own, one quorum append after another.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (router, stop) = (router.clone(), stop.clone());
            tokio::spawn(async move {
                let (stream, mut acked, mut failed) = (format!("rotation-{w}"), Vec::new(), 0u32);
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    match router.append(append(&stream, format!("{w}:{n}"))).await {
                        Ok(_) => acked.push(format!("{w}:{n}")),
                        Err(_) => failed += 1,
                    }
                }
                (stream, acked, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The peer calls open now: a reload that dropped them would open new ones.
    let mut opened_before = Vec::new();
    for i in 0..NODES {
        opened_before.push(metric(&cluster, i, "anthill_peer_calls_opened_total").await);
    }
    // A Raft call and a replication call to each of two peers, at least.
    assert!(opened_before.iter().all(|&n| n >= 4), "peer calls opened: {opened_before:?}");

    // New keys and certificates for every node, same CA, each put in place by a rename.
    let ca = certs::read_ca(&certs).unwrap();
    for i in 0..NODES {
        let name = LocalCluster::name(i);
        let issued = certs::issue(&Kind::Node { hosts: vec![cluster.addrs[i].ip().to_string()] }, &name, 30, Some(&ca)).unwrap();
        let staging = dir.path().join(format!("staging-{name}"));
        certs::write(&staging, &name, &issued).unwrap();
        // Between the two renames the pair does not match; a node reading then keeps the old one.
        for ext in ["key", "crt"] {
            std::fs::rename(staging.join(format!("{name}.{ext}")), certs.join(format!("{name}.{ext}"))).unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..NODES {
        while metric(&cluster, i, "anthill_tls_reloads_total").await < 1 {
            assert!(Instant::now() < deadline, "node-{} never put its new certificate in force", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The expiry in force is the new certificate's (30 days, not the first one's).
    for i in 0..NODES {
        let expires = certs::not_after_unix(&String::from_utf8_lossy(&fingerprint(i))).unwrap() as u64;
        assert_eq!(metric(&cluster, i, "anthill_tls_certificate_expiry_seconds").await, expires, "node-{}", i + 1);
    }
    // New connections get the new certificate.
    for (i, old) in before.iter().enumerate() {
        let served = served_certificate(cluster.addrs[i], &certs.join("ca.crt")).await;
        assert_eq!(served, certs::first_certificate_der(&fingerprint(i)), "node-{} does not serve its new certificate", i + 1);
        assert_ne!(certs::first_certificate_der(old), served);
    }
    // In-flight replication and coordination went on over the calls opened before: not one
    // was dropped and opened again.
    for (i, before) in opened_before.iter().enumerate() {
        assert_eq!(metric(&cluster, i, "anthill_peer_calls_opened_total").await, *before, "node-{} opened peer calls again", i + 1);
    }
    // Members accept each other's new certificates: a restarted member rejoins.
    cluster.kill9(1).unwrap();
    cluster.start_node(1, &[]).unwrap();
    cluster.wait_whole(&spec, Duration::from_secs(60)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut total = 0;
    for writer in writers {
        let (stream, acked, failed) = writer.await.unwrap();
        assert!(!acked.is_empty(), "{stream}: no append was acknowledged ({failed} failed)");
        total += acked.len();
        let stored: Vec<String> =
            router.read_stream_all(&stream).await.unwrap().iter().map(|e| String::from_utf8_lossy(&e.payload).into_owned()).collect();
        let stored_set: std::collections::BTreeSet<&String> = stored.iter().collect();
        let lost: Vec<&String> = acked.iter().filter(|a| !stored_set.contains(a)).collect();
        assert!(lost.is_empty(), "{stream}: {} acknowledged appends lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
    }
    assert!(total > 20, "too little load to say anything: {total} acknowledged appends");
}

/// Takes this process's bearer token away when a test ends, passed or not.
struct TokenReset;

impl Drop for TokenReset {
    fn drop(&mut self) {
        let _ = client::use_token(None);
    }
}

/// `(code, message)` of a call's outcome, `None` when it succeeded.
fn refusal<T>(outcome: Result<T, tonic::Status>) -> Option<(tonic::Code, String)> {
    outcome.err().map(|s| (s.code(), s.message().to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_tokens_and_grants_then_a_tenants_writer_can_neither_read_nor_write_another_tenant_and_a_revoked_token_is_refused_everywhere()
{
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let cluster = LocalCluster::start(&common::exe(), dir.path(), &spec).unwrap();
    cluster.wait_whole(&spec, Duration::from_secs(60)).await.unwrap();
    let certs = dir.path().join("certs");
    let _reset = TokenReset;

    // The admin (a certificate named in auth.cluster_admins) makes a token on node-1, with the
    // command an operator runs.
    let grant = |role: &str, tenant: &str| pb::Grant { role: role.into(), tenant: tenant.into() };
    let created = admin_cli(&certs, &cluster.url(0), &["auth", "create-token", "acme-writer", "--grant", "write:acme", "--json"]);
    let made: serde_json::Value = serde_json::from_slice(&created).unwrap();
    let made = pb::CreateTokenResponse { id: made["id"].as_str().unwrap().into(), token: made["token"].as_str().unwrap().into() };
    let secret = made.token.rsplit_once('_').expect("<prefix><id>_<secret>").1.to_string();
    assert!(secret.len() >= 32, "{secret}");
    // Listed by every node once the table reached it: its id, name and grants, not its secret.
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..NODES {
        loop {
            let listed = String::from_utf8(admin_cli(&certs, &cluster.url(i), &["auth", "list-tokens", "--json"])).unwrap();
            if listed.contains(&made.id) {
                assert!(listed.contains("acme-writer") && listed.contains("write:acme"), "{listed}");
                assert!(!listed.contains(&secret), "node-{} listed a token's secret", i + 1);
                break;
            }
            assert!(Instant::now() < deadline, "node-{} never listed the token: {listed}", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // With the token, through every node's leaderships (the table reached them all).
    client::use_token(Some(made.token.clone())).unwrap();
    let writer = Router::connect(&cluster.urls()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for stream in anthill_node::local::streams_per_partition("acme/orders", PARTITIONS) {
        while let Err(e) = writer.append(append(&stream, "by the writer".into())).await {
            assert!(Instant::now() < deadline, "the token never worked on {stream}'s leader: {e:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let read_acme =
        writer.read(pb::ReadRequest { stream: "acme/orders-0".into(), from_version: 1, max_count: 10, linearizable: false }).await;
    assert!(read_acme.is_ok(), "write includes read: {read_acme:?}");
    let (code, message) = refusal(writer.append(append("globex/orders-1", "not mine".into())).await).expect("globex refused the write");
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(message.contains("needs write:globex, and holds write:acme"), "{message}");
    let read = writer.read(pb::ReadRequest { stream: "globex/orders-1".into(), from_version: 1, max_count: 10, linearizable: false }).await;
    assert_eq!(refusal(read).map(|r| r.0), Some(tonic::Code::PermissionDenied));
    let mut on_node = client::connect(&cluster.url(1)).await.unwrap();
    let partition =
        on_node.log.read_partition(pb::ReadPartitionRequest { partition: 0, from_position: 1, max_count: 10, linearizable: false });
    assert_eq!(refusal(partition.await).map(|r| r.0), Some(tonic::Code::PermissionDenied), "a partition holds every tenant");
    let drain = on_node.node.drain(pb::DrainRequest { node: String::new(), undo: false }).await;
    assert_eq!(refusal(drain).map(|r| r.0), Some(tonic::Code::PermissionDenied), "draining needs cluster-admin");
    let create = on_node.auth.create_token(pb::CreateTokenRequest { name: "escalation".into(), grants: vec![grant("cluster-admin", "")] });
    assert_eq!(refusal(create.await).map(|r| r.0), Some(tonic::Code::PermissionDenied));

    // A certificate principal gets the grants the table gives its name.
    client::use_token(None).unwrap();
    ensure_certificate(&certs, &Kind::Client, "alice").unwrap();
    admin_cli(&certs, &cluster.url(0), &["auth", "set-grants", "alice", "--grant", "read:acme"]);
    let alice = raw_client(&cluster.url(2), &certs.join("ca.crt"), Some((&certs, "alice"))).await.unwrap();
    let mut alice = pb::event_log_client::EventLogClient::new(alice);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let read =
            alice.read(pb::ReadRequest { stream: "acme/orders-0".into(), from_version: 1, max_count: 10, linearizable: false }).await;
        match read {
            Ok(r) if !r.get_ref().events.is_empty() => break,
            // Node-3 may not have the grant yet, or may not lead the stream's partition (then it
            // still answers from its replica).
            other => assert!(Instant::now() < deadline, "alice never read acme on node-3: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let append_as_alice = alice.append(append("acme/orders-0", "alice writes".into())).await;
    assert_eq!(refusal(append_as_alice).map(|r| r.0), Some(tonic::Code::PermissionDenied), "read does not include write");

    // Every node takes the token now (so the refusals below come from the revocation); a
    // session opened with it on the leader of acme/orders-0 appends there and not to globex.
    client::use_token(Some(made.token.clone())).unwrap();
    let leader = writer.table().leaders[writer.partition_of("acme/orders-0") as usize].clone().expect("a leader");
    let mut session_client = client::connect(&leader).await.unwrap();
    let (session_tx, session_rx) = tokio::sync::mpsc::channel(8);
    let mut answers =
        session_client.log.append_session(tokio_stream::wrappers::ReceiverStream::new(session_rx)).await.unwrap().into_inner();
    let mut session_append = async |id: u64, stream: &str| {
        session_tx.send(pb::AppendSessionRequest { id, append: Some(append(stream, format!("session {id}"))) }).await.unwrap();
        let answer = answers.message().await.unwrap().expect("an answer");
        assert_eq!(answer.id, id);
        match answer.result.expect("a result") {
            pb::append_session_response::Result::Appended(_) => None,
            pb::append_session_response::Result::Failure(f) => Some(tonic::Code::from_i32(f.code)),
        }
    };
    assert_eq!(session_append(1, "acme/orders-0").await, None);
    assert_eq!(session_append(2, "globex/orders-0").await, Some(tonic::Code::PermissionDenied));
    for i in 0..NODES {
        let mut c = client::connect(&cluster.url(i)).await.unwrap();
        c.node
            .status(pb::StatusRequest {})
            .await
            .unwrap_or_else(|e| panic!("node-{} refused the token before its revocation: {e:?}", i + 1));
    }
    client::use_token(None).unwrap();
    // Revoked on node-1, refused by every node.
    let revoked: serde_json::Value =
        serde_json::from_slice(&admin_cli(&certs, &cluster.url(0), &["auth", "revoke-token", &made.id, "--json"])).unwrap();
    assert_eq!(revoked["revoked"].as_bool(), Some(true), "{revoked}");
    client::use_token(Some(made.token.clone())).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..NODES {
        let mut c = client::connect(&cluster.url(i)).await.unwrap();
        loop {
            match c.node.status(pb::StatusRequest {}).await {
                Err(s) if s.code() == tonic::Code::Unauthenticated => break,
                other => assert!(Instant::now() < deadline, "node-{} still takes the revoked token: {other:?}", i + 1),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The session opened before the revocation is refused from then on too.
    assert_eq!(session_append(3, "acme/orders-0").await, Some(tonic::Code::Unauthenticated));
    client::use_token(None).unwrap();

    // Nothing of the refused writes is stored.
    let router = Router::connect(&cluster.urls()).await.unwrap();
    assert!(router.read_stream_all("globex/orders-1").await.unwrap().is_empty());
    let acme: Vec<Vec<u8>> = router.read_stream_all("acme/orders-0").await.unwrap().into_iter().map(|e| e.payload).collect();
    assert_eq!(acme, vec![b"by the writer".to_vec(), b"session 1".to_vec()]);
    // The replicated table keeps the token as a hash: no node's files hold its secret (they do
    // hold its id, so the scan reads where the table is kept).
    for i in 0..NODES {
        assert!(!any_file_contains(&dir.path().join(LocalCluster::name(i)), made.id.as_bytes()).is_empty(), "node-{}", i + 1);
        let found = any_file_contains(&dir.path().join(LocalCluster::name(i)), secret.as_bytes());
        assert!(found.is_empty(), "the token's secret in {found:?}");
    }
    // Each change is in the audit stream of the node that made it (records are appended a moment
    // after the action).
    let deadline = Instant::now() + Duration::from_secs(20);
    for (action, detail) in [("token created", made.id.as_str()), ("grants set", "alice"), ("token revoked", made.id.as_str())] {
        loop {
            let records = audit_records(&router, "node-1").await;
            let by_admin = |r: &anthill_node::security::audit::Record| r.by == "certificate \"admin\"" && r.outcome == "done";
            if records.iter().any(|r| by_admin(r) && r.action == action && r.detail.contains(detail)) {
                break;
            }
            assert!(Instant::now() < deadline, "no {action:?} record about {detail}: {records:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Runs the `anthill` command as the admin against `url`; its standard output, once it succeeded.
fn admin_cli(certs: &Path, url: &str, args: &[&str]) -> Vec<u8> {
    let out = admin_command(certs, url, args);
    assert!(out.status.success(), "anthill {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Runs the `anthill` command as the admin against `url`.
fn admin_command(certs: &Path, url: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::exe())
        .arg("--tls-ca")
        .arg(certs.join("ca.crt"))
        .arg("--tls-cert")
        .arg(certs.join("admin.crt"))
        .arg("--tls-key")
        .arg(certs.join("admin.key"))
        .args(args)
        .args(["--server", url])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_tls_and_an_address_at_its_connection_limit_then_its_next_connection_is_closed_before_any_handshake() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // The members reach each other from their own addresses (127.0.0.11-13); this process
    // connects from 127.0.0.1.
    let spec = ClusterSpec { node_args: vec!["--max-connections-per-address".into(), "3".into()], ..spec() };
    let cluster = LocalCluster::start(&common::exe(), dir.path(), &spec).unwrap();
    cluster.wait_whole(&spec, Duration::from_secs(60)).await.unwrap();
    let mut admin = client::connect(&cluster.url(0)).await.unwrap();
    admin.node.status(pb::StatusRequest {}).await.unwrap();
    let addr = cluster.nodes[0].as_ref().unwrap().grpc_addr;
    let certs = dir.path().join("certs");
    // Three connections from one address finish their handshakes; its fourth is closed before
    // any. The node accepts in the order the connections were made, so this holds however slow
    // it is.
    let mut open = Vec::new();
    for n in 1..=3 {
        open.push(tls_from_limited_source(&certs, addr).await.unwrap_or_else(|e| panic!("connection {n} of 3: {e}")));
    }
    let fourth = tls_from_limited_source(&certs, addr).await.map(|_| ());
    assert!(fourth.as_ref().is_err_and(closed_unread), "a fourth connection from one address: {fourth:?}");
    assert_eq!(metric(&cluster, 0, "anthill_connections_refused_total").await, 1);
    // The admin, at another address, is still served.
    admin.node.status(pb::StatusRequest {}).await.unwrap();
    // A connection ended frees its place (once the node has seen it end). Until then each
    // attempt is closed: refused, or (a starved node) its handshake timed out.
    drop(open.pop());
    let handshake_failures = metric(&cluster, 0, "anthill_tls_handshake_failures_total").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut closed = 0;
    loop {
        match tls_from_limited_source(&certs, addr).await {
            Ok(_) => break,
            Err(e) if closed_unread(&e) => closed += 1,
            Err(e) => panic!("a connection after one ended: {e}"),
        }
        assert!(Instant::now() < deadline, "the freed place was not given again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = metric(&cluster, 0, "anthill_connections_refused_total").await - 1;
    let failed = metric(&cluster, 0, "anthill_tls_handshake_failures_total").await - handshake_failures;
    assert_eq!(refused + failed, closed, "each closed attempt is a refusal or a failed handshake");
}

/// A TLS connection to `addr` from [`common::LIMITED_SOURCE`], as `admin` of the CA under
/// `certs`: Ok once its handshake is done (it holds one of the address's places), an error when
/// the node closed it first. Waits for one or the other however slowly the node accepts.
async fn tls_from_limited_source(
    certs: &Path,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use anthill_node::security::tls;
    use rustls_pki_types::pem::PemObject;
    let pem = |name: &str| std::fs::read(certs.join(name)).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&pem("admin.key")).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(tls::root_store(&pem("ca.crt")).unwrap())
        .with_client_auth_cert(tls::certificates(&pem("admin.crt")).unwrap(), key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = common::connect_from_limited_source(addr).await;
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp);
    tokio::time::timeout(Duration::from_secs(60), handshake)
        .await
        .expect("the node neither finished a handshake nor closed the connection in 60 s")
}

/// Whether a handshake failed because the node closed the connection (not over a certificate).
fn closed_unread(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe)
}

/// The audit records of `node`'s stream, read by the admin (through any node).
async fn audit_records(router: &Router, node: &str) -> Vec<anthill_node::security::audit::Record> {
    let events = router.read_stream_all(&anthill_node::security::audit::stream_of(node)).await.unwrap();
    events.iter().map(|e| serde_json::from_slice(&e.payload).expect("an audit record")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_admin_actions_and_refusals_then_each_is_a_record_in_the_audit_stream_of_the_node_that_saw_it_even_one_leading_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let cluster = LocalCluster::start(&common::exe(), dir.path(), &spec).unwrap();
    cluster.wait_whole(&spec, Duration::from_secs(60)).await.unwrap();
    let _reset = TokenReset;

    // Node-2 hands its leaderships over: its records can reach its stream only through the
    // leader of that stream's partition, another node.
    let mut admin_on_2 = client::connect(&cluster.url(1)).await.unwrap();
    admin_on_2.node.drain(pb::DrainRequest { node: "node-2".into(), undo: false }).await.unwrap();
    let leads_nothing = async |admin: &mut client::Clients| {
        let status = admin.node.status(pb::StatusRequest {}).await.unwrap().into_inner();
        status.cluster.unwrap().partitions.iter().all(|p| p.leader != "node-2")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !leads_nothing(&mut admin_on_2).await {
        assert!(Instant::now() < deadline, "node-2 still leads a partition 30 s after its drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut admin = client::connect(&cluster.url(0)).await.unwrap();
    let grant = pb::Grant { role: "write".into(), tenant: "acme".into() };
    let made = admin.auth.create_token(pb::CreateTokenRequest { name: "acme-writer".into(), grants: vec![grant] }).await;
    let made = made.unwrap().into_inner();

    // The token's refusals on node-2 (once node-2 knows the token).
    client::use_token(Some(made.token.clone())).unwrap();
    let mut writer_on_2 = client::connect(&cluster.url(1)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let read =
            writer_on_2.log.read(pb::ReadRequest { stream: "globex/orders".into(), from_version: 1, max_count: 1, linearizable: false });
        match refusal(read.await) {
            Some((tonic::Code::PermissionDenied, _)) => break,
            other => assert!(Instant::now() < deadline, "node-2 never refused the token's read of globex: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain = writer_on_2.node.drain(pb::DrainRequest { node: String::new(), undo: true }).await;
    assert_eq!(refusal(drain).map(|r| r.0), Some(tonic::Code::PermissionDenied));
    let read_audit =
        writer_on_2.log.read(pb::ReadRequest { stream: "$audit/node-2".into(), from_version: 1, max_count: 10, linearizable: false });
    assert_eq!(
        refusal(read_audit.await).map(|r| r.0),
        Some(tonic::Code::PermissionDenied),
        "only read:* and cluster-admin read audit streams"
    );
    client::use_token(None).unwrap();

    // Not even a cluster admin writes an audit stream.
    let router = Router::connect(&cluster.urls()).await.unwrap();
    let forged = router.append(append("$audit/node-2", "forged".into())).await;
    let (code, message) = refusal(forged).expect("the forged record refused");
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");

    // Every record is in its node's stream: node-2's through the Cluster.Audit call.
    let deadline = Instant::now() + Duration::from_secs(20);
    let token_by = format!("token {} (\"acme-writer\")", made.id);
    let expected = |records: &[anthill_node::security::audit::Record]| {
        let has = |by: &str, action: &str, outcome: &str, detail: &str| {
            records.iter().any(|r| r.by == by && r.action == action && r.outcome == outcome && r.detail.contains(detail))
        };
        has("certificate \"admin\"", "drain", "allowed", "node-2")
            && has(&token_by, "refused: missing grant", "refused", "needs read:globex")
            && has(&token_by, "drain", "refused", "needs cluster-admin")
            && has(&token_by, "refused: missing grant", "refused", "needs read:$audit")
    };
    loop {
        let records = audit_records(&router, "node-2").await;
        if expected(&records) {
            assert!(records.iter().all(|r| r.id.starts_with("node-2:")), "{records:?}");
            assert!(!records.iter().any(|r| r.detail.contains("forged")), "{records:?}");
            break;
        }
        assert!(Instant::now() < deadline, "node-2's audit stream lacks records: {records:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let created = |records: &[anthill_node::security::audit::Record]| {
        records.iter().any(|r| r.action == "token created" && r.detail.contains(&made.id) && r.detail.contains("write:acme"))
    };
    while !created(&audit_records(&router, "node-1").await) {
        assert!(Instant::now() < deadline, "node-1's audit stream lacks the token's creation");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(leads_nothing(&mut admin_on_2).await, "node-2 led a partition meanwhile: its records may not have been forwarded");
    assert!(metric(&cluster, 1, "anthill_audit_records_written_total").await >= 4);
    assert_eq!(metric(&cluster, 1, "anthill_audit_records_dropped_total").await, 0);
}

/// Whether any file under `dir` (recursively) contains `needle`.
fn any_file_contains(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(any_file_contains(&path, needle));
        } else if std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle)) {
            found.push(path);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_encryption_when_a_tenant_is_forgotten_then_no_replica_returns_its_payloads_and_no_data_file_holds_its_plaintext() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = ClusterSpec { encrypt: true, ..spec() };
    let cluster = LocalCluster::start(&common::exe(), dir.path(), &spec).unwrap();
    cluster.wait_whole(&spec, Duration::from_secs(60)).await.unwrap();
    let router = Router::connect(&cluster.urls()).await.unwrap();
    let mut appended = Vec::new();
    for tenant in ["acme", "globex"] {
        for (n, stream) in anthill_node::local::streams_per_partition(&format!("{tenant}/orders"), PARTITIONS).into_iter().enumerate() {
            let mut request = append(&stream, format!("{}-SECRET-{n}", tenant.to_uppercase()));
            request.events[0].metadata.insert("note".into(), format!("{}-META-{n}", tenant.to_uppercase()));
            router.append(request).await.unwrap();
            appended.push((tenant, stream));
        }
    }
    // A book of acme's in the ledger: the processor seals its events and state, followers open
    // them to keep their read models.
    let mut admin = client::connect(&cluster.url(0)).await.unwrap();
    let open_account = pb::OpenAccountRequest {
        book: "acme:shop".into(),
        command_id: "open-1".into(),
        account: "till".into(),
        currency: "EUR".into(),
        credit_limit: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let ledger_leader = router.table().leaders[router.partition_of("ledger/acme:shop") as usize].clone().unwrap();
    let mut on_leader = client::connect(&ledger_leader).await.unwrap();
    while let Err(e) = on_leader.ledger.open_account(open_account.clone()).await {
        assert!(Instant::now() < deadline, "the ledger refused acme's account: {e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let safe = pb::OpenAccountRequest { command_id: "open-2".into(), account: "safe".into(), ..open_account.clone() };
    on_leader.ledger.open_account(safe).await.unwrap();
    let deposit = pb::DepositRequest { book: "acme:shop".into(), command_id: "in-1".into(), account: "till".into(), amount: 500 };
    on_leader.ledger.deposit(deposit).await.unwrap();
    let transfer = pb::TransferRequest {
        book: "acme:shop".into(),
        command_id: "move-1".into(),
        from: "till".into(),
        to: "safe".into(),
        amount: 120,
        transfer: "ACME-TRANSFER-MARKER".into(),
    };
    on_leader.ledger.transfer(transfer.clone()).await.unwrap();
    // A retry on the leader is a duplicate (the id was recorded with the sealed events).
    assert!(on_leader.ledger.transfer(transfer).await.unwrap().into_inner().duplicate);
    // Every replica's read model followed the sealed events.
    for i in 0..NODES {
        let mut c = client::connect(&cluster.url(i)).await.unwrap();
        let ask = pb::GetBalanceRequest { book: "acme:shop".into(), account: "safe".into() };
        loop {
            let balance = c.ledger.get_balance(ask.clone()).await;
            if balance.as_ref().is_ok_and(|b| b.get_ref().balance == 120) {
                break;
            }
            assert!(Instant::now() < deadline, "node-{}: the safe's balance {balance:?}", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Read back through the log API, the book's events come opened.
    let book = router.read_stream_all("ledger/acme:shop").await.unwrap();
    assert_eq!(book.len(), 4, "{book:?}");
    assert!(String::from_utf8_lossy(&book[3].payload).contains("ACME-TRANSFER-MARKER"), "{:?}", book[3]);
    assert_eq!(book[3].metadata.get("anthill.command_id").map(String::as_str), Some("move-1"));
    // Client metadata may not pose as a sealed event.
    let mut posing = append("globex/orders-x", "posing".into());
    posing.events[0].metadata.insert("anthill-enc".into(), "1:0000".into());
    assert_eq!(router.append(posing).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    // Read back in clear, payload and metadata.
    for (tenant, stream) in &appended {
        let events = router.read_stream_all(stream).await.unwrap();
        let payload = String::from_utf8(events[0].payload.clone()).unwrap();
        assert!(payload.starts_with(&format!("{}-SECRET-", tenant.to_uppercase())), "{stream}: {payload}");
        assert!(events[0].metadata["note"].starts_with(&format!("{}-META-", tenant.to_uppercase())));
    }
    // The data files hold the streams' names (in clear: they are index keys) but no payload or
    // metadata in clear, on any node.
    let data: Vec<_> = (0..NODES).map(|i| dir.path().join(LocalCluster::name(i))).collect();
    assert!(data.iter().all(|d| !any_file_contains(d, appended[0].1.as_bytes()).is_empty()), "the scan reads the data files");
    for needle in ["ACME-SECRET", "ACME-META", "GLOBEX-SECRET", "GLOBEX-META", "ACME-TRANSFER-MARKER"] {
        let found: Vec<_> = data.iter().flat_map(|d| any_file_contains(d, needle.as_bytes())).collect();
        assert!(found.is_empty(), "{needle} in clear in {found:?}");
    }

    let forgotten = admin.tenants.forget(pb::ForgetTenantRequest { tenant: "acme".into() }).await.unwrap().into_inner();
    assert!(forgotten.had_key);

    // Every replica: acme's stream reads are refused, its partition reads come redacted, and
    // globex reads on.
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..NODES {
        let mut c = client::connect(&cluster.url(i)).await.unwrap();
        for (tenant, stream) in &appended {
            let read = pb::ReadRequest { stream: stream.clone(), from_version: 1, max_count: 10, linearizable: false };
            loop {
                let outcome = c.log.read(read.clone()).await;
                let settled = match (*tenant, &outcome) {
                    ("acme", Err(s)) => s.code() == tonic::Code::FailedPrecondition && s.message().contains("forgotten"),
                    ("globex", Ok(r)) => r.get_ref().events.len() == 1,
                    _ => false,
                };
                if settled {
                    break;
                }
                assert!(Instant::now() < deadline, "node-{}: {stream} read {outcome:?}", i + 1);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Every acme event this replica holds comes redacted; it holds them all (its streams'
        // and its book's) once replication reached it.
        loop {
            let mut redacted = 0;
            for partition in 0..PARTITIONS {
                let read = pb::ReadPartitionRequest { partition, from_position: 1, max_count: 1000, linearizable: false };
                let events = c.log.read_partition(read).await.unwrap().into_inner().events;
                for e in events.iter().filter(|e| e.stream.starts_with("acme/") || e.stream == "ledger/acme:shop") {
                    redacted += 1;
                    assert!(
                        e.payload.is_empty() && e.metadata.get("anthill-forgotten").map(String::as_str) == Some("acme"),
                        "node-{}: {e:?}",
                        i + 1
                    );
                }
                assert!(events.iter().filter(|e| e.stream.starts_with("globex/")).all(|e| e.payload.starts_with(b"GLOBEX-SECRET")));
            }
            if redacted > PARTITIONS as usize {
                break;
            }
            assert!(Instant::now() < deadline, "node-{}: {redacted} of acme's events redacted (its streams and its book)", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let refused = router.append(append("acme/orders-new", "after forgetting".into())).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    // Replication goes on: a globex event written after the forgetting reaches every replica,
    // each partition's positions dense from 1 (acme's events hold their places).
    let late = router.append(append(&appended.iter().find(|(t, _)| *t == "globex").unwrap().1, "GLOBEX-SECRET-late".into())).await;
    let late = late.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..NODES {
        let mut c = client::connect(&cluster.url(i)).await.unwrap();
        loop {
            let mut seen_late = false;
            for partition in 0..PARTITIONS {
                let read = pb::ReadPartitionRequest { partition, from_position: 1, max_count: 1000, linearizable: false };
                let events = c.log.read_partition(read).await.unwrap().into_inner().events;
                let positions: Vec<u64> = events.iter().map(|e| e.position).collect();
                assert!(
                    positions.iter().enumerate().all(|(k, p)| *p == k as u64 + 1),
                    "node-{} partition {partition}: {positions:?}",
                    i + 1
                );
                seen_late |= events.iter().any(|e| e.position == late.last_position && e.payload == b"GLOBEX-SECRET-late");
            }
            if seen_late {
                break;
            }
            assert!(Instant::now() < deadline, "node-{} never got globex's event written after the forgetting", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A subscription from the start gets acme's events redacted, globex's opened.
    let mut c = client::connect(&cluster.url(1)).await.unwrap();
    let mut feed = c.log.subscribe(pb::SubscribeRequest { from_position: 1, ..Default::default() }).await.unwrap().into_inner();
    let (mut caught_up, mut acme_seen, mut globex_seen) = (0, 0, 0);
    while caught_up < PARTITIONS {
        let next = tokio::time::timeout(Duration::from_secs(10), feed.next()).await.expect("the subscription stalled").unwrap().unwrap();
        match next.message {
            Some(pb::subscribe_response::Message::CaughtUp(_)) => caught_up += 1,
            Some(pb::subscribe_response::Message::Event(e)) if e.stream.starts_with("acme/") || e.stream == "ledger/acme:shop" => {
                assert!(e.payload.is_empty() && e.metadata.get("anthill-forgotten").map(String::as_str) == Some("acme"), "{e:?}");
                acme_seen += 1;
            }
            Some(pb::subscribe_response::Message::Event(e)) if e.stream.starts_with("globex/") => {
                assert!(e.payload.starts_with(b"GLOBEX-SECRET"), "{e:?}");
                globex_seen += 1;
            }
            _ => {}
        }
    }
    assert!(acme_seen > PARTITIONS as usize && globex_seen > PARTITIONS as usize, "{acme_seen} acme, {globex_seen} globex events");
    // The book is gone with its tenant.
    let balance = on_leader.ledger.get_balance(pb::GetBalanceRequest { book: "acme:shop".into(), account: "till".into() }).await;
    assert_eq!(balance.map_err(|e| e.code()).err(), Some(tonic::Code::FailedPrecondition));
    let late = pb::DepositRequest { book: "acme:shop".into(), command_id: "in-2".into(), account: "till".into(), amount: 1 };
    let refused = on_leader.ledger.deposit(late).await.unwrap_err();
    assert!(refused.code() == tonic::Code::FailedPrecondition && refused.message().contains("forgotten"), "{refused:?}");
    for needle in ["ACME-SECRET", "ACME-META", "after forgetting", "ACME-TRANSFER-MARKER"] {
        let found: Vec<_> = data.iter().flat_map(|d| any_file_contains(d, needle.as_bytes())).collect();
        assert!(found.is_empty(), "{needle} in clear in {found:?}");
    }
}

/// Every acme and globex event node `url` holds, opened: (partition, position, stream, payload).
async fn tenant_events(url: &str) -> Vec<(u32, u64, String, Vec<u8>)> {
    tenant_events_at(url).await.unwrap()
}

/// [`tenant_events`], or the node's refusal.
async fn tenant_events_at(url: &str) -> Result<Vec<(u32, u64, String, Vec<u8>)>, tonic::Status> {
    let mut c = client::connect(url).await.unwrap();
    let mut held = Vec::new();
    for partition in 0..PARTITIONS {
        let read = pb::ReadPartitionRequest { partition, from_position: 1, max_count: 1000, linearizable: false };
        for e in c.log.read_partition(read).await?.into_inner().events {
            if e.stream.starts_with("acme/") || e.stream.starts_with("globex/") {
                held.push((partition, e.position, e.stream, e.payload));
            }
        }
    }
    Ok(held)
}

/// Rewrites node `i`'s config so its `encryption` has `key_file` and `previous_key_files`, and
/// restarts it; returns once the cluster is whole again.
async fn restart_with_keys(cluster: &mut LocalCluster, spec: &ClusterSpec, dir: &Path, i: usize, key_file: &Path, previous: &[&Path]) {
    let file = dir.join(format!("{}.yaml", LocalCluster::name(i)));
    let config = std::fs::read_to_string(&file).unwrap();
    let (head, _) = config.split_once("encryption:\n").expect("an encryption section, last in the file");
    let previous: Vec<String> = previous.iter().map(|p| format!("\"{}\"", p.display())).collect();
    let section = format!("  key_file: \"{}\"\n  previous_key_files: [{}]\n", key_file.display(), previous.join(", "));
    std::fs::write(&file, format!("{head}encryption:\n{section}")).unwrap();
    cluster.terminate(i, Duration::from_secs(30)).unwrap();
    cluster.start_node(i, &[]).unwrap();
    cluster.wait_whole(spec, Duration::from_secs(60)).await.unwrap();
}

/// Waits until every node answers `stream`'s read with the one event holding `payload`.
async fn readable_everywhere(cluster: &LocalCluster, stream: &str, payload: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..NODES {
        let mut c = client::connect(&cluster.url(i)).await.unwrap();
        let read = pb::ReadRequest { stream: stream.into(), from_version: 1, max_count: 10, linearizable: false };
        loop {
            let outcome = c.log.read(read.clone()).await;
            if outcome.as_ref().is_ok_and(|r| r.get_ref().events.iter().any(|e| e.payload == payload.as_bytes())) {
                break;
            }
            assert!(Instant::now() < deadline, "node-{} never read {stream}: {outcome:?}", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_encryption_when_the_kek_is_rotated_and_the_keys_rewrapped_then_every_node_reads_with_the_new_key_alone_and_the_log_is_unchanged()
 {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = ClusterSpec { encrypt: true, ..spec() };
    let mut cluster = LocalCluster::start(&common::exe(), dir.path(), &spec).unwrap();
    cluster.wait_whole(&spec, Duration::from_secs(60)).await.unwrap();
    let router = Router::connect(&cluster.urls()).await.unwrap();
    for tenant in ["acme", "globex"] {
        for stream in anthill_node::local::streams_per_partition(&format!("{tenant}/orders"), PARTITIONS) {
            router.append(append(&stream, format!("{tenant}-ROTATED-{stream}"))).await.unwrap();
        }
    }
    // What every replica holds once replication caught up.
    let deadline = Instant::now() + Duration::from_secs(20);
    let before = loop {
        let first = tenant_events(&cluster.url(0)).await;
        let (second, third) = (tenant_events(&cluster.url(1)).await, tenant_events(&cluster.url(2)).await);
        if first.len() == 2 * PARTITIONS as usize && first == second && first == third {
            break first;
        }
        assert!(Instant::now() < deadline, "the replicas never held the same events: {first:?} {second:?} {third:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(before.iter().all(|(_, _, stream, payload)| payload.ends_with(stream.as_bytes())), "{before:?}");

    // (1) The new KEK beside the old one on every node, the old one still current: once every
    // node has both, (2) the new one current, node after node. Meanwhile each new tenant's key is
    // wrapped by whichever key is current where it is made, and every node opens it.
    let (old, new) = (dir.path().join("kek"), dir.path().join("kek-2"));
    let key: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    std::fs::write(&new, key).unwrap();
    for i in 0..NODES {
        restart_with_keys(&mut cluster, &spec, dir.path(), i, &old, &[&new]).await;
    }
    for i in 0..NODES {
        restart_with_keys(&mut cluster, &spec, dir.path(), i, &new, &[&old]).await;
        let router = Router::connect(&cluster.urls()).await.unwrap();
        for n in 0..PARTITIONS {
            let stream = format!("initech{i}-{n}/orders");
            router.append(append(&stream, format!("{stream} during the rotation"))).await.unwrap();
            readable_everywhere(&cluster, &stream, &format!("{stream} during the rotation")).await;
        }
    }
    // (3) Re-wrap, with the command an operator runs; its audit record is in before a restart.
    let certs = dir.path().join("certs");
    let url = cluster.url(0);
    let rewrap = || {
        let report: serde_json::Value = serde_json::from_slice(&admin_cli(&certs, &url, &["tenant", "rewrap-keys", "--json"])).unwrap();
        report["rewrapped"].as_u64().unwrap()
    };
    assert!(rewrap() >= 2, "acme's and globex's keys at least");
    assert_eq!(rewrap(), 0, "every key is wrapped by the new KEK already");
    let router = Router::connect(&cluster.urls()).await.unwrap();
    let rewrapped = |records: &[anthill_node::security::audit::Record]| {
        records.iter().any(|r| r.by == "certificate \"admin\"" && r.action == "data keys re-wrapped" && r.outcome == "done")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rewrapped(&audit_records(&router, "node-1").await) {
        assert!(Instant::now() < deadline, "node-1's audit stream lacks the re-wrap");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // (4) The old KEK gone: every node still opens every event, at the positions it had.
    for i in 0..NODES {
        restart_with_keys(&mut cluster, &spec, dir.path(), i, &new, &[]).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..NODES {
        // A restarted node loads its copy of the key table in the background: until then its
        // reads answer UNAVAILABLE (retry).
        loop {
            let held = tenant_events_at(&cluster.url(i)).await;
            match &held {
                Ok(held) if *held == before => break,
                Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "node-{} after the rotation: {s:?}", i + 1),
                Ok(_) => {}
            }
            assert!(Instant::now() < deadline, "node-{} after the rotation holds {held:?}, not {before:?}", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for i in 0..NODES {
        for n in 0..PARTITIONS {
            let stream = format!("initech{i}-{n}/orders");
            readable_everywhere(&cluster, &stream, &format!("{stream} during the rotation")).await;
        }
    }

    // Forgetting a tenant takes that tenant's admin: acme's may not forget globex; globex's
    // may, with the command, and only with --yes.
    let token = |name: &str, grant: &str| {
        let made = admin_cli(&certs, &url, &["auth", "create-token", name, "--grant", grant, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&made).unwrap()["token"].as_str().unwrap().to_string()
    };
    let (acme_admin, globex_admin) = (token("acme-admin", "admin:acme"), token("globex-admin", "admin:globex"));
    let refused = admin_command(&certs, &url, &["--token", &acme_admin, "tenant", "forget", "globex", "--yes"]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("needs admin:globex"), "{refused:?}");
    let unconfirmed = admin_command(&certs, &url, &["--token", &globex_admin, "tenant", "forget", "globex"]);
    assert!(!unconfirmed.status.success());
    assert!(String::from_utf8_lossy(&unconfirmed.stderr).contains("run again with --yes"), "{unconfirmed:?}");
    let forgot = admin_cli(&certs, &url, &["--token", &globex_admin, "tenant", "forget", "globex", "--yes", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&forgot).unwrap();
    assert_eq!((report["forgotten"].as_bool(), report["had_key"].as_bool()), (Some(true), Some(true)), "{report}");
    let router = Router::connect(&cluster.urls()).await.unwrap();
    let globex = before.iter().find(|e| e.2.starts_with("globex/")).unwrap().2.clone();
    let read = pb::ReadRequest { stream: globex, from_version: 1, max_count: 10, linearizable: false };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match router.read(read.clone()).await {
            Err(s) if s.code() == tonic::Code::FailedPrecondition && s.message().contains("forgotten") => break,
            other => assert!(Instant::now() < deadline, "globex read after forgetting: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let forgotten = |records: &[anthill_node::security::audit::Record]| {
        records.iter().any(|r| r.by.contains("(\"globex-admin\")") && r.action == "tenant forgotten" && r.detail.contains("globex"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !forgotten(&audit_records(&router, "node-1").await) {
        assert!(Instant::now() < deadline, "node-1's audit stream lacks the forgetting");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes `bytes` to `path` by a rename, as a deployment tool puts a file in place.
fn put_in_place(path: &Path, bytes: &[u8]) {
    let staging = path.with_extension("staging");
    std::fs::write(&staging, bytes).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

/// Waits until every node of `cluster` counted `at_least` TLS reloads.
async fn reloaded(cluster: &LocalCluster, at_least: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..NODES {
        while metric(cluster, i, "anthill_tls_reloads_total").await < at_least {
            assert!(Instant::now() < deadline, "node-{} never put in force {what}", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_the_documented_ca_rotation_then_the_cluster_serves_throughout_and_ends_trusting_the_new_ca_alone() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let mut cluster = LocalCluster::start(&common::exe(), dir.path(), &spec).unwrap();
    cluster.wait_whole(&spec, Duration::from_secs(60)).await.unwrap();
    let certs = dir.path().join("certs");
    let old_ca = certs::read_ca(&certs).unwrap();
    let new_ca = certs::issue(&Kind::Ca, "Anthill local cluster CA 2", 30, None).unwrap();
    // A client of the old CA, to be refused at the end.
    let old_client = dir.path().join("old-client");
    certs::write(&old_client, "olduser", &certs::issue(&Kind::Client, "olduser", 30, Some(&old_ca)).unwrap()).unwrap();
    std::fs::copy(certs.join("ca.crt"), old_client.join("ca.crt")).unwrap();
    let (urls, mut acked) = (cluster.urls(), Vec::new());
    let mut write = async |step: &str| {
        let router = Router::connect(&urls).await.unwrap();
        for stream in anthill_node::local::streams_per_partition("rotation", PARTITIONS) {
            router.append(append(&stream, format!("{step} {stream}"))).await.unwrap_or_else(|e| panic!("{step}: {stream}: {e:?}"));
            acked.push((stream.clone(), format!("{step} {stream}")));
        }
    };
    write("before").await;

    // (1) Both CAs in every node's ca_file (and this client's), (2) in force everywhere.
    put_in_place(&certs.join("ca.crt"), format!("{}{}", old_ca.cert_pem, new_ca.cert_pem).as_bytes());
    anthill_node::local::use_tls_as_admin(&certs).unwrap();
    reloaded(&cluster, 1, "the two CAs").await;
    write("both CAs").await;
    // (3) Every node's and the admin's certificate from the new CA, each put in place by renames.
    for i in 0..NODES {
        let name = LocalCluster::name(i);
        let issued = certs::issue(&Kind::Node { hosts: vec![cluster.addrs[i].ip().to_string()] }, &name, 30, Some(&new_ca)).unwrap();
        put_in_place(&certs.join(format!("{name}.key")), issued.key_pem.as_bytes());
        put_in_place(&certs.join(format!("{name}.crt")), issued.cert_pem.as_bytes());
    }
    let admin = certs::issue(&Kind::Client, "admin", 30, Some(&new_ca)).unwrap();
    put_in_place(&certs.join("admin.key"), admin.key_pem.as_bytes());
    put_in_place(&certs.join("admin.crt"), admin.cert_pem.as_bytes());
    anthill_node::local::use_tls_as_admin(&certs).unwrap();
    reloaded(&cluster, 2, "its new certificate").await;
    write("new certificates").await;
    // (4) The old CA gone from the files.
    put_in_place(&certs.join("ca.crt"), new_ca.cert_pem.as_bytes());
    anthill_node::local::use_tls_as_admin(&certs).unwrap();
    reloaded(&cluster, 3, "the new CA alone").await;
    write("new CA alone").await;

    // A member restarted now joins its peers on the new CA alone.
    cluster.kill9(1).unwrap();
    cluster.start_node(1, &[]).unwrap();
    cluster.wait_whole(&spec, Duration::from_secs(60)).await.unwrap();
    write("after a restart").await;
    // The old CA's client is refused in the handshake, as a stranger's would be.
    let failures_before = metric(&cluster, 0, "anthill_tls_handshake_failures_total").await;
    match raw_client(&cluster.url(0), &certs.join("ca.crt"), Some((&old_client, "olduser"))).await {
        Err(_) => {}
        Ok(channel) => match pb::node_client::NodeClient::new(channel).status(pb::StatusRequest {}).await {
            Ok(_) => panic!("a client of the old CA was served"),
            Err(s) => assert!(
                !matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated),
                "a client of the old CA got past the handshake: {s:?}"
            ),
        },
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&cluster, 0, "anthill_tls_handshake_failures_total").await < failures_before + 1 {
        assert!(Instant::now() < deadline, "node-1 counted no failed handshake for the old CA's client");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every acknowledged write is there, on every replica.
    let router = Router::connect(&cluster.urls()).await.unwrap();
    for (stream, payload) in &acked {
        let stored = router.read_stream_all(stream).await.unwrap();
        assert!(stored.iter().any(|e| e.payload == payload.as_bytes()), "{stream}: {payload:?} lost");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..NODES {
        while tenant_count(&cluster.url(i), "rotation-").await < acked.len() {
            assert!(Instant::now() < deadline, "node-{} holds fewer than the {} writes", i + 1, acked.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How many events of streams starting with `prefix` node `url` holds.
async fn tenant_count(url: &str, prefix: &str) -> usize {
    let mut c = client::connect(url).await.unwrap();
    let mut count = 0;
    for partition in 0..PARTITIONS {
        let read = pb::ReadPartitionRequest { partition, from_position: 1, max_count: 1000, linearizable: false };
        count += c.log.read_partition(read).await.unwrap().into_inner().events.iter().filter(|e| e.stream.starts_with(prefix)).count();
    }
    count
}
