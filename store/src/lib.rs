//! The state store: desired state behind one trait (get, put, compare-and-swap by
//! revision, delete, list by prefix, watch). Every write bumps a store-wide revision,
//! as etcd does, and each key remembers the revision of its last change.
//!
//! [`embedded::EmbeddedStore`] keeps everything in one redb file in the data directory;
//! [`etcd::EtcdStore`] keeps it in etcd, for several hosts. Both pass one conformance
//! suite (`store/tests/conformance`).

pub mod embedded;
pub mod etcd;
mod journal;

use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use socket_http::ApiError;
use tokio::sync::broadcast;

/// Which store the api keeps its state in (`--store`).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum StoreLocation {
    /// `embedded` (the default): `<data dir>/store.redb`.
    #[default]
    Embedded,
    /// `etcd://host:port[,host:port…][/prefix]`.
    Etcd(etcd::EtcdTarget),
}

impl std::str::FromStr for StoreLocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "embedded" {
            Ok(Self::Embedded)
        } else if s.starts_with("etcd://") {
            s.parse().map(Self::Etcd)
        } else {
            Err(format!(
                "{s:?}: the store is `embedded` or etcd://host:port[,host:port…][/prefix]"
            ))
        }
    }
}

/// Opens the store at `location`.
pub async fn open(
    location: &StoreLocation,
    data_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn StateStore>, StoreError> {
    Ok(match location {
        StoreLocation::Embedded => std::sync::Arc::new(embedded::EmbeddedStore::open(&data_dir.join("store.redb"))?),
        StoreLocation::Etcd(target) => std::sync::Arc::new(etcd::EtcdStore::connect(target).await?),
    })
}

/// A value and the revision of its last change.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub revision: u64,
}

/// A change seen by a watcher.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    pub key: String,
    /// `None` for a delete.
    pub value: Option<Vec<u8>>,
    pub revision: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("revision conflict on {key}: expected {expected:?}, found {found:?}")]
    Conflict {
        key: String,
        expected: Option<u64>,
        found: Option<u64>,
    },
    #[error("the state store is unavailable: {0}")]
    Unavailable(String),
    #[error("stored value under {key} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    /// The lease named lapsed (or was revoked): keys written with it are gone.
    #[error("lease {0:x} has lapsed")]
    LeaseLapsed(LeaseId),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => ApiError::conflict(e.to_string()),
            StoreError::Unavailable(_) => ApiError::unavailable(e.to_string()),
            StoreError::Corrupt { .. } => ApiError::internal(e.to_string()),
            StoreError::LeaseLapsed(_) => ApiError::unavailable(e.to_string()),
        }
    }
}

/// The store trait every backend implements.
pub trait StateStore: Send + Sync {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Versioned>, StoreError>>;
    /// Writes unconditionally; returns the new revision.
    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<u64, StoreError>>;
    /// [`put`](Self::put) for progress records written often (a saga's after each
    /// step): it must survive a crash of the process, but may be lost when the whole
    /// host goes down (then the processes whose progress it records are gone too). The
    /// embedded store commits it without waiting for the disk; etcd has only one kind of
    /// write.
    fn put_relaxed<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.put(key, value)
    }
    /// Writes only when the key's revision is `expected` (`None`: the key must not exist).
    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;
    /// Deletes a key; returns whether it existed.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Every key starting with `prefix`, in key order.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<(String, Versioned)>, StoreError>>;
    /// Changes from now on (filter by prefix on the receiving side).
    fn watch(&self) -> broadcast::Receiver<WatchEvent>;
    /// A value that differs after any key under `prefix` was written or deleted, much
    /// cheaper to read than the keys themselves: what a cache of a listing compares
    /// before serving it (it may also change when nothing under `prefix` did).
    fn prefix_version<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<PrefixVersion, StoreError>>;

    /// A lease of `ttl` (etcd rounds it up to whole seconds): keys written with it
    /// ([`put_leased`](Self::put_leased)) live while its holder renews it
    /// ([`keep_alive`](Self::keep_alive)) within `ttl`, and are deleted (watchers see
    /// the deletes) when it lapses or is revoked. What a host's liveness and the
    /// leader's term are made of.
    fn grant_lease(&self, ttl: std::time::Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>>;
    /// Renews `lease` for its whole TTL; `Ok(false)` when it has lapsed already.
    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// Ends `lease` now, deleting its keys; a lapsed or unknown lease is no error.
    fn revoke_lease(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Writes `key` tied to `lease` (see [`grant_lease`](Self::grant_lease)). With
    /// `create_only`, only when the key does not exist: `Ok(None)` when it does.
    /// [`StoreError::LeaseLapsed`] when the lease is gone. A key written with a lease
    /// is only ever written with one.
    fn put_leased<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: LeaseId,
        create_only: bool,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>>;
}

/// A lease's id (etcd's own, or the embedded store's counter).
pub type LeaseId = i64;

/// See [`StateStore::prefix_version`]; only equality means anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefixVersion {
    pub count: u64,
    pub revision: u64,
}

/// JSON helpers over any store.
pub async fn get_json<T: DeserializeOwned>(store: &dyn StateStore, key: &str) -> Result<Option<(T, u64)>, StoreError> {
    match store.get(key).await? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v.value)
            .map(|t| Some((t, v.revision)))
            .map_err(|e| StoreError::Corrupt {
                key: key.to_string(),
                message: e.to_string(),
            }),
    }
}

/// Changes the record under `key` with `change` and writes it back unless another
/// writer got there first, in which case it reads and tries again (8 times at most,
/// then the last conflict is the error). `change` says whether it changed anything;
/// nothing is written when it did not, nor when the key is absent. Returns whether it
/// wrote.
pub async fn update_json<T: Serialize + DeserializeOwned>(
    store: &dyn StateStore,
    key: &str,
    mut change: impl FnMut(&mut T) -> bool,
) -> Result<bool, StoreError> {
    let mut last = None;
    for _ in 0..8 {
        let Some((mut value, revision)) = get_json::<T>(store, key).await? else {
            return Ok(false);
        };
        if !change(&mut value) {
            return Ok(false);
        }
        match store.compare_and_swap(key, Some(revision), encode(&value)).await {
            Ok(_) => return Ok(true),
            Err(e @ StoreError::Conflict { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| StoreError::Unavailable(format!("{key} could not be updated"))))
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Our record types contain no maps with non-string keys, so encoding cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

pub async fn list_json<T: DeserializeOwned>(store: &dyn StateStore, prefix: &str) -> Result<Vec<(T, u64)>, StoreError> {
    store
        .list(prefix)
        .await?
        .into_iter()
        .map(|(k, v)| {
            serde_json::from_slice(&v.value)
                .map(|t| (t, v.revision))
                .map_err(|e| StoreError::Corrupt {
                    key: k,
                    message: e.to_string(),
                })
        })
        .collect()
}
