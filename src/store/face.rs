//! The state store as async code sees it. RocksDB calls block (a synced write waits for
//! the disk), so every call from async code goes through [`StateStore::run`], which moves
//! it to a blocking thread: the one place where the async side meets RocksDB. Code that
//! already runs on a blocking thread (the scan, staging) takes the [`Store`] itself from
//! [`StateStore::blocking`].

use std::sync::Arc;

use anyhow::{Context, Result};

use super::{ProtectionRecord, Store};
use crate::ids::ProtectionName;

#[derive(Clone)]
pub struct StateStore {
    store: Arc<Store>,
}

impl StateStore {
    pub fn new(store: Store) -> StateStore {
        StateStore {
            store: Arc::new(store),
        }
    }

    /// Runs `f` on the store on a blocking thread.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .context("state store task")?
    }

    /// Runs a step of protection `prot` on a blocking thread: the shape of every durable
    /// transition.
    pub async fn step<T, F>(&self, prot: &ProtectionName, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store, &ProtectionName) -> Result<T> + Send + 'static,
    {
        let prot = prot.clone();
        self.run(move |s| f(s, &prot)).await
    }

    /// The protection's record (or a new protection's).
    pub async fn record(&self, prot: &ProtectionName) -> Result<ProtectionRecord> {
        self.step(prot, |s, p| s.record(p)).await
    }

    /// The store, for code that is on a blocking thread already.
    pub fn blocking(&self) -> &Arc<Store> {
        &self.store
    }
}
