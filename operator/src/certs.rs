//! The nodes' certificates (`spec.tls`, docs/kubernetes.md "TLS").
//!
//! Every certificate of a cluster `c` lives in a Secret of type `kubernetes.io/tls` holding
//! `tls.crt`, `tls.key` and `ca.crt` (the layout cert-manager writes), so both modes mount the
//! same way:
//! - `c-<ordinal>-tls`: node `c-<ordinal>`'s certificate, for server and client authentication,
//!   naming its member name first (the name its peers check), then its pod's stable DNS names,
//!   the client Service's names and the loopback (`anthill` run inside the pod);
//! - `c-admin-tls`: a client certificate for the principal `admin`, a cluster administrator of
//!   the nodes (`auth.cluster_admins`): the operator's own identity towards the nodes, and the
//!   one `kubectl exec` into a node pod gets.
//!
//! With mode `Operator` the operator keeps a CA in `c-ca` (made once, never replaced) and issues
//! the others from it: again when one is missing, names other hosts or another CA, cannot be
//! read, or expires within [`RENEW_WITHIN_S`]. The nodes read renewed files without a restart
//! (the kubelet updates a mounted Secret within about a minute). With mode `Secrets` the
//! operator only reads `c-admin-tls` and checks that every node's Secret is there.

use std::collections::BTreeMap;

use anthill_node::client::ClientTls;
use anthill_node::security::certs::{self, Issued, Kind};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::crd::{AnthillCluster, TlsMode};
use crate::resources;

/// The CA's lifetime, and every certificate's it issues.
pub const CA_DAYS: u32 = 3650;
pub const LEAF_DAYS: u32 = 90;
/// A certificate is issued again once it has less than this left (a third of its life).
pub const RENEW_WITHIN_S: i64 = 30 * 86_400;
/// The principal of the administrator's certificate.
pub const ADMIN: &str = "admin";
/// The annotation on an issued Secret: for whom and under which CA it was issued
/// ([`issued_for`]).
pub const ISSUED_FOR: &str = "anthill.io/issued-for";

pub fn ca_secret_name(cluster: &str) -> String {
    format!("{cluster}-ca")
}

pub fn node_secret_name(cluster: &str, ordinal: i32) -> String {
    format!("{cluster}-{ordinal}-tls")
}

pub fn admin_secret_name(cluster: &str) -> String {
    format!("{cluster}-admin-tls")
}

/// The names node `ordinal`'s certificate holds after its member name: its pod's stable DNS
/// names, the client Service's, and the loopback.
pub fn node_hosts(cluster: &AnthillCluster, ordinal: i32) -> Vec<String> {
    let name = cluster.name_any();
    let ns = cluster.namespace().unwrap_or_else(|| "default".into());
    let pod = resources::member(cluster, ordinal).0;
    let nodes = resources::headless_service_name(&name);
    vec![
        format!("{pod}.{nodes}.{ns}.svc"),
        format!("{pod}.{nodes}.{ns}.svc.cluster.local"),
        name.clone(),
        format!("{name}.{ns}"),
        format!("{name}.{ns}.svc"),
        format!("{name}.{ns}.svc.cluster.local"),
        "localhost".into(),
        "127.0.0.1".into(),
    ]
}

/// What an issued Secret must have been issued for: the subject, its names and the CA (a hash).
pub fn issued_for(subject: &str, hosts: &[String], ca_cert_pem: &str) -> String {
    resources::config_hash(&format!("{subject}\n{}\n{ca_cert_pem}", hosts.join(",")))
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// Why `secret` must be issued again to be what `wanted` ([`issued_for`]) says, at `now`
/// (seconds since the epoch); `None`: it is good.
pub fn renewal(secret: Option<&Secret>, wanted: &str, now: i64) -> Option<&'static str> {
    let Some(secret) = secret else { return Some("it does not exist") };
    if secret.annotations().get(ISSUED_FOR).map(String::as_str) != Some(wanted) {
        return Some("its names or its CA changed");
    }
    let (Some(cert), Some(_)) = (text(secret, "tls.crt"), text(secret, "tls.key")) else {
        return Some("it lacks tls.crt or tls.key");
    };
    match certs::not_after_unix(&cert) {
        None => Some("its certificate cannot be read"),
        Some(expires) if expires - now < RENEW_WITHIN_S => Some("it expires within 30 days"),
        Some(_) => None,
    }
}

/// A `kubernetes.io/tls` Secret of the cluster holding `issued` and the CA's certificate.
pub fn secret(cluster: &AnthillCluster, name: String, issued: &Issued, ca_cert_pem: &str, issued_for: Option<&str>) -> Secret {
    let owner = cluster.controller_owner_ref(&()).expect("a cluster read from the API server has a uid");
    let mut annotations = BTreeMap::new();
    if let Some(hash) = issued_for {
        annotations.insert(ISSUED_FOR.to_string(), hash.to_string());
    }
    let data = BTreeMap::from([
        ("tls.crt".to_string(), ByteString(issued.cert_pem.clone().into_bytes())),
        ("tls.key".to_string(), ByteString(issued.key_pem.clone().into_bytes())),
        ("ca.crt".to_string(), ByteString(ca_cert_pem.as_bytes().to_vec())),
    ]);
    let value = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {
            "name": name, "namespace": cluster.namespace(), "labels": resources::labels(&cluster.name_any()),
            "annotations": annotations, "ownerReferences": [owner],
        },
    });
    let mut secret: Secret = serde_json::from_value(value).expect("a Secret");
    secret.data = Some(data);
    secret
}

/// Why the cluster's certificates cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Something a user must fix (a Secret missing or unreadable); reported in the status.
    #[error("{0}")]
    Unusable(String),
}

/// The client TLS the operator talks to the nodes with, from the administrator's Secret.
fn client_tls(secret: &Secret) -> Result<ClientTls, String> {
    let name = secret.name_any();
    let get = |key: &str| text(secret, key).ok_or_else(|| format!("Secret {name} has no {key}"));
    let (ca, cert, key) = (get("ca.crt")?, get("tls.crt")?, get("tls.key")?);
    ClientTls::from_pem(ca.into_bytes(), Some((cert.into_bytes(), key.into_bytes()))).map_err(|e| format!("Secret {name}: {e:#}"))
}

/// Makes sure `cluster` has the certificates of `mode` for its first `members` nodes (module
/// doc); the operator's client TLS towards the nodes (`None` when TLS is off). `issued` gets
/// one line per certificate issued.
pub async fn ensure(
    client: &Client,
    cluster: &AnthillCluster,
    mode: TlsMode,
    members: i32,
    issued: &mut Vec<String>,
) -> Result<Option<ClientTls>, CertError> {
    let name = cluster.name_any();
    let secrets = Api::<Secret>::namespaced(client.clone(), &cluster.namespace().unwrap_or_default());
    match mode {
        TlsMode::Disabled => Ok(None),
        TlsMode::Secrets => {
            // The pods mount all three; a Secret without `ca.crt` (an ACME issuer's) would keep
            // them from starting.
            let complete = |s: &Secret| ["tls.crt", "tls.key", "ca.crt"].iter().all(|k| text(s, k).is_some());
            let mut missing = Vec::new();
            for ordinal in 0..members {
                let node = node_secret_name(&name, ordinal);
                if !secrets.get_opt(&node).await?.is_some_and(|s| complete(&s)) {
                    missing.push(node);
                }
            }
            let admin = secrets.get_opt(&admin_secret_name(&name)).await?.filter(complete);
            if admin.is_none() {
                missing.push(admin_secret_name(&name));
            }
            match admin {
                Some(admin) if missing.is_empty() => client_tls(&admin).map(Some).map_err(CertError::Unusable),
                _ => Err(CertError::Unusable(format!(
                    "spec.tls.mode is Secrets and these Secrets are missing or lack tls.crt, tls.key or ca.crt: {}",
                    missing.join(", ")
                ))),
            }
        }
        TlsMode::Operator => {
            let ca = ca(&secrets, cluster).await?;
            let now = k8s_openapi::jiff::Timestamp::now().as_second();
            let params = PatchParams::apply(resources::MANAGER).force();
            let mut wanted: Vec<(String, Kind, String)> = (0..members)
                .map(|i| (node_secret_name(&name, i), Kind::Node { hosts: node_hosts(cluster, i) }, resources::member(cluster, i).0))
                .collect();
            wanted.push((admin_secret_name(&name), Kind::Client, ADMIN.to_string()));
            let mut admin = None;
            for (secret_name, kind, subject) in wanted {
                let hosts = match &kind {
                    Kind::Node { hosts } => hosts.clone(),
                    _ => Vec::new(),
                };
                let hash = issued_for(&subject, &hosts, &ca.cert_pem);
                let mut current = secrets.get_opt(&secret_name).await?;
                if let Some(why) = renewal(current.as_ref(), &hash, now) {
                    let leaf = certs::issue(&kind, &subject, LEAF_DAYS, Some(&ca)).map_err(|e| CertError::Unusable(e.to_string()))?;
                    let made = secret(cluster, secret_name.clone(), &leaf, &ca.cert_pem, Some(&hash));
                    current = Some(secrets.patch(&secret_name, &params, &Patch::Apply(made)).await?);
                    tracing::info!(cluster = %name, secret = %secret_name, because = why, "issued a certificate");
                    issued.push(format!("{secret_name} ({why})"));
                }
                if matches!(kind, Kind::Client) {
                    admin = current;
                }
            }
            let admin = admin.expect("the administrator's Secret was just made");
            client_tls(&admin).map(Some).map_err(CertError::Unusable)
        }
    }
}

/// The cluster's CA: read from its Secret, or made (once: an existing Secret is never replaced,
/// and one that cannot be read is for a user to look at).
async fn ca(secrets: &Api<Secret>, cluster: &AnthillCluster) -> Result<Issued, CertError> {
    let name = ca_secret_name(&cluster.name_any());
    let found = match secrets.get_opt(&name).await? {
        Some(found) => found,
        None => {
            let made = certs::issue(&Kind::Ca, &format!("{} CA", cluster.name_any()), CA_DAYS, None)
                .map_err(|e| CertError::Unusable(e.to_string()))?;
            let secret = secret(cluster, name.clone(), &made, &made.cert_pem, None);
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(created) => {
                    tracing::info!(cluster = %cluster.name_any(), secret = %name, "made the cluster's CA");
                    created
                }
                // Made meanwhile (another reconcile): that one is the CA.
                Err(kube::Error::Api(e)) if e.code == 409 => secrets.get(&name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    match (text(&found, "tls.crt"), text(&found, "tls.key")) {
        (Some(cert_pem), Some(key_pem)) => Ok(Issued { cert_pem, key_pem }),
        _ => Err(CertError::Unusable(format!("Secret {name} (the cluster's CA) lacks tls.crt or tls.key; the operator never replaces it"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::tests::cluster;

    fn shop() -> AnthillCluster {
        cluster(json!({ "replicas": 3, "version": "0.1.0", "storage": { "size": "1Gi" } }))
    }

    #[test]
    fn a_node_certificate_names_its_member_first_then_its_pod_the_service_and_the_loopback() {
        let c = shop();
        let hosts = node_hosts(&c, 2);
        assert_eq!(hosts[0], "shop-2.shop-nodes.prod.svc");
        assert!(hosts.contains(&"shop.prod.svc".to_string()) && hosts.contains(&"127.0.0.1".to_string()), "{hosts:?}");
        // Issued as the operator does, it passes the node's own check of its files.
        let ca = certs::issue(&Kind::Ca, "shop CA", 30, None).unwrap();
        let leaf = certs::issue(&Kind::Node { hosts }, "shop-2", LEAF_DAYS, Some(&ca)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = |n: &str, text: &str| {
            let path = dir.path().join(n);
            std::fs::write(&path, text).unwrap();
            path
        };
        let config = anthill_node::config::TlsConfig {
            cert_file: file("tls.crt", &leaf.cert_pem),
            key_file: file("tls.key", &leaf.key_pem),
            ca_file: file("ca.crt", &ca.cert_pem),
            reload_interval_ms: 2000,
        };
        let members = ["shop-0", "shop-1", "shop-2"].map(String::from);
        anthill_node::security::tls::Material::check(&config, "shop-2", &members).unwrap();
    }

    #[test]
    fn a_secret_is_issued_again_when_missing_for_other_names_unreadable_or_near_its_end() {
        let c = shop();
        let ca = certs::issue(&Kind::Ca, "shop CA", 30, None).unwrap();
        let hosts = node_hosts(&c, 0);
        let wanted = issued_for("shop-0", &hosts, &ca.cert_pem);
        let leaf = certs::issue(&Kind::Node { hosts: hosts.clone() }, "shop-0", LEAF_DAYS, Some(&ca)).unwrap();
        let good = secret(&c, "shop-0-tls".into(), &leaf, &ca.cert_pem, Some(&wanted));
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        assert_eq!(renewal(Some(&good), &wanted, now), None);
        assert_eq!(renewal(None, &wanted, now), Some("it does not exist"));
        // Another CA or other names: another hash.
        let other_ca = certs::issue(&Kind::Ca, "other CA", 30, None).unwrap();
        assert_ne!(issued_for("shop-0", &hosts, &other_ca.cert_pem), wanted);
        assert_eq!(renewal(Some(&good), &issued_for("shop-0", &hosts[1..], &ca.cert_pem), now), Some("its names or its CA changed"));
        // 61 days on, 29 are left: renewed.
        assert_eq!(renewal(Some(&good), &wanted, now + 61 * 86_400), Some("it expires within 30 days"));
        assert_eq!(renewal(Some(&good), &wanted, now + 59 * 86_400), None);
        let mut broken = good.clone();
        broken.data.as_mut().unwrap().insert("tls.crt".into(), ByteString(b"garbage".to_vec()));
        assert_eq!(renewal(Some(&broken), &wanted, now), Some("its certificate cannot be read"));
        broken.data.as_mut().unwrap().remove("tls.key");
        assert_eq!(renewal(Some(&broken), &wanted, now), Some("it lacks tls.crt or tls.key"));
        // The administrator's Secret is a client TLS the operator can use.
        let admin = certs::issue(&Kind::Client, ADMIN, LEAF_DAYS, Some(&ca)).unwrap();
        assert!(client_tls(&secret(&c, "shop-admin-tls".into(), &admin, &ca.cert_pem, None)).is_ok());
        let mut no_ca = secret(&c, "shop-admin-tls".into(), &admin, &ca.cert_pem, None);
        no_ca.data.as_mut().unwrap().remove("ca.crt");
        assert_eq!(client_tls(&no_ca).err().unwrap(), "Secret shop-admin-tls has no ca.crt");
    }
}
