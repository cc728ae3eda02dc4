//! `anthill-operator delete-cluster`: deletes one `AnthillCluster` and waits until it is gone,
//! finalizers included. The chart runs it as a `pre-delete` hook when its release holds both the
//! operator and a cluster whose Consul keys go with it (`deleteKeysOnRemoval`): `helm uninstall`
//! deletes the kinds it does not know last, after the operator's Deployment and RBAC, so without
//! the hook the cluster would wait for an operator that is no longer there, its pods running and
//! its keys in Consul.

use std::io::Write;
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams};
use kube::{Client, ResourceExt};

use crate::crd::AnthillCluster;

/// How often the wait reports what it waits for.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// How long a refusal (401, 403) is tried again before it is final.
const REFUSALS_FOR: Duration = Duration::from_secs(30);

/// Deletes AnthillCluster `namespace/name` and returns once the API server no longer has it.
/// Reports each step to `out`. Already gone is done. Still there after `timeout`: an error
/// naming the finalizers that hold it and what to do.
pub async fn delete_cluster(client: Client, namespace: &str, name: &str, timeout: Duration, out: &mut impl Write) -> anyhow::Result<()> {
    let clusters: Api<AnthillCluster> = Api::namespaced(client, namespace);
    let what = format!("AnthillCluster {namespace}/{name}");
    let started = Instant::now();
    let mut reported = started;
    let mut asked = false;
    let mut refused_since = None;
    loop {
        // A failed call is tried again until the deadline (the API server may be busy); a
        // refusal only for a while (the hook's RoleBinding was made a moment before).
        let left =
            if asked { clusters.get_opt(name).await } else { clusters.delete(name, &DeleteParams::default()).await.map(|d| d.left()) };
        let left = match left {
            Ok(None) => {
                writeln!(out, "{what} is gone after {:.0} s", started.elapsed().as_secs_f64())?;
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                writeln!(out, "{what} is not there: nothing to delete")?;
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 401 || e.code == 403 => {
                let since = *refused_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= REFUSALS_FOR {
                    anyhow::bail!("cannot {} {what}: {e}", if asked { "read" } else { "delete" });
                }
                writeln!(out, "refused ({e}); trying again")?;
                None
            }
            Ok(Some(cluster)) => {
                if !asked {
                    writeln!(out, "deleting {what}")?;
                }
                asked = true;
                Some(cluster.finalizers().to_vec())
            }
            Err(e) => {
                writeln!(out, "cannot {} {what} ({e}); trying again", if asked { "read" } else { "delete" })?;
                None
            }
        };
        if started.elapsed() >= timeout && !asked {
            anyhow::bail!("cannot delete {what}: the API server did not take the deletion within {} s", timeout.as_secs());
        }
        if started.elapsed() >= timeout {
            let held = left.map_or("unknown finalizers".to_string(), |f| format!("finalizers {f:?}"));
            anyhow::bail!(
                "{what} is still there after {} s, held by {held}: the operator stops its pods and deletes its \
                 Consul keys before it lets the cluster go. Is the operator running? (`kubectl get events \
                 --field-selector involvedObject.name={name}` shows its steps.)",
                timeout.as_secs()
            );
        }
        if reported.elapsed() >= PROGRESS_EVERY {
            reported = Instant::now();
            if let Some(finalizers) = &left {
                writeln!(out, "waiting {:.0} s: the finalizers {finalizers:?} hold {what}", started.elapsed().as_secs_f64())?;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
