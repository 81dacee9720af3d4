//! The embedded store: one redb file in the data directory, durable on every commit but
//! `put_relaxed`'s (committed without waiting for the disk).

use std::path::Path;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use super::{StateStore, StoreError, Versioned, WatchEvent};

/// key → 8-byte little-endian revision followed by the value.
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// "revision" → the store-wide revision counter.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// A redb-backed [`StateStore`].
pub struct EmbeddedStore {
    db: Arc<Database>,
    events: broadcast::Sender<WatchEvent>,
    /// For [`StateStore::prefix_version`]: the revision of the last change under each
    /// first key segment (`vms/`, …) since the store was opened, and the revision at
    /// opening. The file belongs to this process alone (redb locks it), so every change
    /// passes through here.
    changed: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    opened_at: u64,
}

/// `vms/` for `vms/<id>`; the whole key when it has no `/`.
fn first_segment(key: &str) -> &str {
    key.find('/').map_or(key, |i| &key[..=i])
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn decode(key: &str, raw: &[u8]) -> Result<Versioned, StoreError> {
    if raw.len() < 8 {
        return Err(StoreError::Corrupt {
            key: key.to_string(),
            message: "record shorter than its revision".into(),
        });
    }
    let (rev, value) = raw.split_at(8);
    let mut b = [0u8; 8];
    b.copy_from_slice(rev);
    Ok(Versioned {
        value: value.to_vec(),
        revision: u64::from_le_bytes(b),
    })
}

impl EmbeddedStore {
    /// Opens (or creates) the store file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(unavailable)?;
        let tx = db.begin_write().map_err(unavailable)?;
        tx.open_table(KV).map_err(unavailable)?;
        tx.open_table(META).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        let opened_at = {
            let tx = db.begin_read().map_err(unavailable)?;
            let meta = tx.open_table(META).map_err(unavailable)?;
            meta.get("revision")
                .map_err(unavailable)?
                .map(|v| v.value())
                .unwrap_or(0)
        };
        Ok(Self {
            db: Arc::new(db),
            events: broadcast::channel(4096).0,
            changed: Default::default(),
            opened_at,
        })
    }

    /// Runs a write transaction on a blocking thread. `f` returns the value to report
    /// and, when it changed something, the watch event.
    async fn write<T: Send + 'static>(
        &self,
        durability: redb::Durability,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>, u64) -> Result<(T, Option<WatchEvent>), StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (db, changed, events) = (self.db.clone(), self.changed.clone(), self.events.clone());
        // Everything after the commit happens on the blocking thread too, so a caller
        // that goes away mid-write (a client hanging up) cannot leave a committed change
        // unannounced.
        tokio::task::spawn_blocking(move || {
            let mut tx = db.begin_write().map_err(unavailable)?;
            tx.set_durability(durability);
            let (out, event) = {
                let mut meta = tx.open_table(META).map_err(unavailable)?;
                let next = meta
                    .get("revision")
                    .map_err(unavailable)?
                    .map(|v| v.value())
                    .unwrap_or(0)
                    + 1;
                let mut kv = tx.open_table(KV).map_err(unavailable)?;
                let (out, event) = f(&mut kv, next)?;
                if event.is_some() {
                    meta.insert("revision", next).map_err(unavailable)?;
                }
                (out, event)
            };
            match event {
                Some(ev) => {
                    tx.commit().map_err(unavailable)?;
                    // Recorded after the commit: a reader that sees the new version
                    // also sees the new data.
                    let mut changed = changed.lock().unwrap_or_else(|p| p.into_inner());
                    let last = changed.entry(first_segment(&ev.key).to_string()).or_default();
                    *last = (*last).max(ev.revision);
                    drop(changed);
                    let _ = events.send(ev);
                }
                None => tx.abort().map_err(unavailable)?,
            }
            Ok::<_, StoreError>(out)
        })
        .await
        .map_err(unavailable)?
    }
}

/// Stores `value` under `key` at `rev` and returns the revision with its watch event.
fn stored(
    kv: &mut redb::Table<&str, &[u8]>,
    key: String,
    rev: u64,
    value: Vec<u8>,
) -> Result<(u64, Option<WatchEvent>), StoreError> {
    store_value(kv, &key, rev, &value)?;
    Ok((
        rev,
        Some(WatchEvent {
            key,
            value: Some(value),
            revision: rev,
        }),
    ))
}

fn store_value(kv: &mut redb::Table<&str, &[u8]>, key: &str, rev: u64, value: &[u8]) -> Result<(), StoreError> {
    let mut raw = Vec::with_capacity(8 + value.len());
    raw.extend_from_slice(&rev.to_le_bytes());
    raw.extend_from_slice(value);
    kv.insert(key, raw.as_slice()).map_err(unavailable)?;
    Ok(())
}

impl StateStore for EmbeddedStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Versioned>, StoreError>> {
        Box::pin(async move {
            let tx = self.db.begin_read().map_err(unavailable)?;
            let kv = tx.open_table(KV).map_err(unavailable)?;
            match kv.get(key).map_err(unavailable)? {
                Some(raw) => Ok(Some(decode(key, raw.value())?)),
                None => Ok(None),
            }
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<u64, StoreError>> {
        let key = key.to_string();
        Box::pin(self.write(redb::Durability::Immediate, move |kv, rev| stored(kv, key, rev, value)))
    }

    /// Committed without waiting for the disk: a crash of this process loses nothing
    /// (the kernel has the pages), a crash of the host may lose the last such writes.
    fn put_relaxed<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<u64, StoreError>> {
        let key = key.to_string();
        Box::pin(self.write(redb::Durability::Eventual, move |kv, rev| stored(kv, key, rev, value)))
    }

    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let key = key.to_string();
        Box::pin(self.write(redb::Durability::Immediate, move |kv, rev| {
            let found = match kv.get(key.as_str()).map_err(unavailable)? {
                Some(raw) => Some(decode(&key, raw.value())?.revision),
                None => None,
            };
            if found != expected {
                return Err(StoreError::Conflict { key, expected, found });
            }
            stored(kv, key, rev, value)
        }))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        let key = key.to_string();
        Box::pin(self.write(redb::Durability::Immediate, move |kv, rev| {
            let existed = kv.remove(key.as_str()).map_err(unavailable)?.is_some();
            let event = existed.then_some(WatchEvent {
                key,
                value: None,
                revision: rev,
            });
            Ok((existed, event))
        }))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<(String, Versioned)>, StoreError>> {
        Box::pin(async move {
            let tx = self.db.begin_read().map_err(unavailable)?;
            let kv = tx.open_table(KV).map_err(unavailable)?;
            let mut out = Vec::new();
            for item in kv.range(prefix..).map_err(unavailable)? {
                let (k, v) = item.map_err(unavailable)?;
                let k = k.value();
                if !k.starts_with(prefix) {
                    break;
                }
                out.push((k.to_string(), decode(k, v.value())?));
            }
            Ok(out)
        })
    }

    fn watch(&self) -> broadcast::Receiver<WatchEvent> {
        self.events.subscribe()
    }

    fn prefix_version<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<super::PrefixVersion, StoreError>> {
        let changed = self.changed.lock().unwrap_or_else(|p| p.into_inner());
        let revision = if prefix.contains('/') {
            changed.get(first_segment(prefix)).copied()
        } else {
            // A prefix within the first segment: any change at all counts.
            changed.values().max().copied()
        }
        .unwrap_or(self.opened_at);
        Box::pin(std::future::ready(Ok(super::PrefixVersion { count: 0, revision })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn data_and_revisions_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.redb");
        let rev = {
            let store = EmbeddedStore::open(&path).expect("open");
            store.put("k", b"v".to_vec()).await.expect("put")
        };
        let store = EmbeddedStore::open(&path).expect("reopen");
        assert_eq!(
            store.get("k").await.expect("get"),
            Some(Versioned {
                value: b"v".to_vec(),
                revision: rev
            })
        );
        assert!(
            store.put("k2", vec![]).await.expect("put") > rev,
            "the revision counter persists"
        );
    }
}
