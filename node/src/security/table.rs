//! A small table every node must hold (the auth table, the tenants' data keys), kept as one
//! JSON value: in a cluster under one key of the coordination store, so it is replicated like
//! the rest of the cluster's state and every node follows it; on a single node in a file of
//! its data directory.
//!
//! Changes are read-modify-write: a compare-and-set on the key's modify index in the store (a
//! change made meanwhile by another node is re-read and the change applied again, never
//! overwritten), a lock and a whole-file rename on a single node. A change is in force on the
//! node that made it when [`Replicated::update`] returns, on the others once they read it
//! (a blocking read of the key, usually within milliseconds).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, watch};
use tonic::Status;

use crate::coordination::Cas;
use crate::coordination::member::Coordination;

#[derive(Clone)]
enum Backend {
    File { path: PathBuf, lock: Arc<Mutex<()>> },
    Store { coordination: Coordination, key: String },
}

/// The node's copy of one table, kept current, and the way to change it.
pub struct Replicated<T> {
    current: watch::Receiver<Arc<T>>,
    publish: Arc<watch::Sender<Arc<T>>>,
    backend: Backend,
    /// What the table is, for errors ("the auth table").
    what: &'static str,
    /// The modify index of the table last published (a lower bound for a change this node
    /// made): the follower and [`Replicated::update`] both publish only above it, under this
    /// lock, so an older table never replaces a newer one.
    published: Arc<parking_lot::Mutex<u64>>,
}

impl<T> Clone for Replicated<T> {
    fn clone(&self) -> Self {
        Replicated {
            current: self.current.clone(),
            publish: self.publish.clone(),
            backend: self.backend.clone(),
            what: self.what,
            published: self.published.clone(),
        }
    }
}

impl<T: Serialize + DeserializeOwned + Default + Clone + Send + Sync + 'static> Replicated<T> {
    /// A single node's table in `path` (empty when the file does not exist yet).
    pub fn in_file(path: PathBuf, what: &'static str) -> anyhow::Result<Self> {
        let table = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: not {what}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => T::default(),
            Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        };
        let (publish, current) = watch::channel(Arc::new(table));
        let backend = Backend::File { path, lock: Arc::default() };
        Ok(Replicated { current, publish: Arc::new(publish), backend, what, published: Arc::default() })
    }

    /// A cluster's table under `key` in its coordination store, followed until `stopped`.
    pub fn in_store(coordination: Coordination, key: String, what: &'static str, stopped: watch::Receiver<bool>) -> Self {
        let (publish, current) = watch::channel(Arc::new(T::default()));
        let backend = Backend::Store { coordination, key };
        let table = Replicated { current, publish: Arc::new(publish), backend, what, published: Arc::default() };
        tokio::spawn(table.clone().follow(stopped));
        table
    }

    pub fn get(&self) -> Arc<T> {
        self.current.borrow().clone()
    }

    /// Keeps the local copy equal to the store's. A blocking read returns once the store's
    /// index passed the last one seen; the copy is replaced when the key's own modify index
    /// moved.
    async fn follow(self, mut stopped: watch::Receiver<bool>) {
        let Backend::Store { coordination, key } = &self.backend else { return };
        let (mut index, mut seen) = (0u64, None::<u64>);
        loop {
            let listed = tokio::select! {
                listed = coordination.follow(key, index, Duration::from_secs(30)) => listed,
                _ = crate::coordination::transport::until_stopped(&mut stopped) => return,
            };
            match listed {
                Ok(listing) => {
                    // A store that answers at once with the same index (nothing to wait for)
                    // is not asked again right away.
                    if listing.index == index {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    index = listing.index;
                    let entry = listing.entries.into_iter().find(|e| e.key == *key);
                    let modified = entry.as_ref().map(|e| e.modify_index);
                    if modified == seen {
                        continue;
                    }
                    seen = modified;
                    match entry.map(|e| serde_json::from_slice::<T>(&e.value)).transpose() {
                        Ok(table) => self.publish_if_newer(modified.unwrap_or(0), table.unwrap_or_default()),
                        Err(e) => tracing::error!(%key, error = %e, "the stored {} does not parse; keeping the previous one", self.what),
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the {}; trying again", self.what);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Publishes `table` as of `index` unless a newer one was published already.
    fn publish_if_newer(&self, index: u64, table: T) {
        let mut published = self.published.lock();
        if index >= *published {
            *published = index;
            self.publish.send_replace(Arc::new(table));
        }
    }

    /// Applies `change` where the table is kept; re-applied to a newer table when another node
    /// changed it meanwhile. In force on this node when it returns.
    pub async fn update<R>(&self, change: impl Fn(&mut T) -> Result<R, Status>) -> Result<R, Status> {
        let what = self.what;
        let unavailable = |e: &dyn std::fmt::Display| Status::unavailable(format!("cannot change the {what}: {e}"));
        match &self.backend {
            Backend::File { path, lock } => {
                let _one = lock.lock().await;
                let mut table = (*self.get()).clone();
                let result = change(&mut table)?;
                let bytes = serde_json::to_vec_pretty(&table).map_err(|e| unavailable(&e))?;
                let temporary = path.with_extension("json.partial");
                let written = std::fs::File::create(&temporary)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes).and_then(|_| f.sync_all()))
                    .and_then(|_| std::fs::rename(&temporary, path))
                    // The rename itself must survive a power loss (a revoked token stays revoked).
                    .and_then(|_| {
                        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
                        std::fs::File::open(dir).and_then(|d| d.sync_all())
                    });
                written.map_err(|e| unavailable(&e))?;
                self.publish.send_replace(Arc::new(table));
                Ok(result)
            }
            Backend::Store { coordination, key } => {
                for _ in 0..16 {
                    let entry = coordination.get(key).await.map_err(|e| unavailable(&e))?;
                    let (mut table, cas) = match &entry {
                        Some(e) => (serde_json::from_slice::<T>(&e.value).map_err(|e| unavailable(&e))?, Cas::ModifyIndex(e.modify_index)),
                        None => (T::default(), Cas::Absent),
                    };
                    // The entry written below gets a higher modify index than this one.
                    let written_above = entry.as_ref().map_or(0, |e| e.modify_index) + 1;
                    let result = change(&mut table)?;
                    let bytes = serde_json::to_vec(&table).map_err(|e| unavailable(&e))?;
                    if coordination.put_if(key, &bytes, cas).await.map_err(|e| unavailable(&e))? {
                        self.publish_if_newer(written_above, table);
                        return Ok(result);
                    }
                }
                Err(Status::aborted(format!("the {what} kept changing under this change; try again")))
            }
        }
    }
}
