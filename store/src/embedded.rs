//! The embedded store: one redb file in the data directory, durable on every commit,
//! and beside it a journal ([`crate::journal`]) of `put_relaxed`'s writes: appended,
//! never synced, folded into the redb file at the next open. A relaxed write costs one
//! `write` instead of a redb commit (tens of microseconds instead of hundreds), which is
//! what lets a saga record its progress before every step without slowing the change.
//!
//! Every write holds one lock (the writer), which hands out revisions in commit order.
//! A key lives in the redb file or, when its last change was relaxed, in the journal's
//! in-memory map; readers look at the map first, then the file, and take the newer.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use crate::journal::{Entry, Journal};

use futures_util::future::BoxFuture;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use super::{LeaseId, StateStore, StoreError, Versioned, WatchEvent};

/// key → 8-byte little-endian revision followed by the value.
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// "revision" → the store-wide revision counter.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The keys written with a lease. Leases live in this process's memory: when the
/// store is opened again, the process that renewed them is gone, and so are they.
const LEASED: TableDefinition<&str, ()> = TableDefinition::new("leased");

/// The leases granted since the store was opened, and their keys.
#[derive(Default)]
struct Leases {
    next: std::sync::atomic::AtomicI64,
    held: Mutex<std::collections::HashMap<LeaseId, Held>>,
    /// Whether the task that deletes the keys of lapsed leases runs.
    reaper: std::sync::OnceLock<()>,
}

struct Held {
    ttl: std::time::Duration,
    deadline: std::time::Instant,
    keys: std::collections::BTreeSet<String>,
}

/// How often lapsed leases are looked for.
const REAP_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// A redb-backed [`StateStore`].
pub struct EmbeddedStore {
    db: Arc<Database>,
    events: broadcast::Sender<WatchEvent>,
    /// For [`StateStore::prefix_version`]: the revision of the last change under each
    /// first key segment (`vms/`, …) since the store was opened, and the revision at
    /// opening. The file belongs to this process alone (redb locks it), so every change
    /// passes through here.
    changed: Arc<Mutex<std::collections::HashMap<String, u64>>>,
    opened_at: u64,
    /// Serializes writes and hands out revisions; holds the journal.
    writer: Arc<Mutex<Writer>>,
    /// Keys whose last change is in the journal (`None`: deleted), with its revision.
    relaxed: Arc<Relaxed>,
    leases: Arc<Leases>,
}

struct Writer {
    revision: u64,
    journal: Journal,
}

/// Each journal-held key's last change: its revision and value (`None`: deleted).
type Relaxed = RwLock<BTreeMap<String, (u64, Option<Vec<u8>>)>>;

/// The newer of the journal's and the file's version of a key (`None`: absent or
/// deleted). The journal's is read first: a write that moves a key out of the journal
/// commits to the file before it leaves the map.
fn newer(journal: Option<(u64, Option<Vec<u8>>)>, file: Option<Versioned>) -> Option<Versioned> {
    match (journal, file) {
        (Some((rev, value)), f) if f.as_ref().is_none_or(|f| f.revision < rev) => {
            value.map(|value| Versioned { value, revision: rev })
        }
        (_, f) => f,
    }
}

fn read_relaxed(relaxed: &Relaxed, key: &str) -> Option<(u64, Option<Vec<u8>>)> {
    relaxed.read().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
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
        tx.open_table(LEASED).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        let (mut journal, last) = Journal::open(&path.with_extension("journal")).map_err(unavailable)?;
        // The journal's changes go into the file, each where it is newer than the
        // file's, in one durable commit; then the journal starts empty.
        let tx = db.begin_write().map_err(unavailable)?;
        let opened_at = {
            let mut meta = tx.open_table(META).map_err(unavailable)?;
            let mut kv = tx.open_table(KV).map_err(unavailable)?;
            let mut revision = meta
                .get("revision")
                .map_err(unavailable)?
                .map(|v| v.value())
                .unwrap_or(0);
            // Every revision handed out counts, applied or not.
            revision = last.values().map(|e| e.revision).fold(revision, u64::max);
            for (key, e) in &last {
                let current = match kv.get(key.as_str()).map_err(unavailable)? {
                    Some(raw) => Some(decode(key, raw.value())?.revision),
                    None => None,
                };
                if current.is_some_and(|c| c >= e.revision) {
                    continue;
                }
                match &e.value {
                    Some(v) => store_value(&mut kv, key, e.revision, v)?,
                    None => {
                        kv.remove(key.as_str()).map_err(unavailable)?;
                    }
                }
            }
            // Keys of the leases of the process that had the store before: gone with it.
            let mut leased = tx.open_table(LEASED).map_err(unavailable)?;
            let stale: Vec<String> = leased
                .iter()
                .map_err(unavailable)?
                .map(|item| item.map(|(k, _)| k.value().to_string()).map_err(unavailable))
                .collect::<Result<_, _>>()?;
            for key in &stale {
                if kv.remove(key.as_str()).map_err(unavailable)?.is_some() {
                    revision += 1;
                }
                leased.remove(key.as_str()).map_err(unavailable)?;
            }
            meta.insert("revision", revision).map_err(unavailable)?;
            revision
        };
        tx.commit().map_err(unavailable)?;
        journal.clear().map_err(unavailable)?;
        Ok(Self {
            db: Arc::new(db),
            events: broadcast::channel(4096).0,
            changed: Default::default(),
            opened_at,
            writer: Arc::new(Mutex::new(Writer {
                revision: opened_at,
                journal,
            })),
            relaxed: Default::default(),
            leases: Default::default(),
        })
    }

    /// Starts (once) the task that deletes the keys of lapsed leases. It holds the
    /// database weakly: it ends with the store, and never keeps the file open.
    fn start_reaper(&self) {
        let leases = Arc::downgrade(&self.leases);
        let db = Arc::downgrade(&self.db);
        let (writer, relaxed) = (self.writer.clone(), self.relaxed.clone());
        let (changed, events) = (self.changed.clone(), self.events.clone());
        self.leases.reaper.get_or_init(|| {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(REAP_EVERY).await;
                    let (Some(leases), Some(db)) = (leases.upgrade(), db.upgrade()) else {
                        return;
                    };
                    let now = std::time::Instant::now();
                    let lapsed: Vec<Held> = {
                        let mut held = leases.held.lock().unwrap_or_else(|p| p.into_inner());
                        let ids: Vec<LeaseId> = held
                            .iter()
                            .filter(|(_, h)| h.deadline <= now)
                            .map(|(id, _)| *id)
                            .collect();
                        ids.into_iter().filter_map(|id| held.remove(&id)).collect()
                    };
                    let keys: Vec<String> = lapsed.into_iter().flat_map(|h| h.keys).collect();
                    if keys.is_empty() {
                        continue;
                    }
                    let (writer, relaxed, changed, events) =
                        (writer.clone(), relaxed.clone(), changed.clone(), events.clone());
                    let done = tokio::task::spawn_blocking(move || {
                        for key in keys {
                            if let Err(e) = remove_key(&db, &writer, &relaxed, &changed, &events, key.clone()) {
                                tracing::warn!("cannot delete {key} of a lapsed lease: {e}");
                            }
                        }
                    });
                    let _ = done.await;
                }
            });
        });
    }

    /// Runs a write transaction on a blocking thread. `f` returns the value to report
    /// and, when it changed something, the watch event.
    async fn write<T: Send + 'static>(
        &self,
        durability: redb::Durability,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>, u64, &Relaxed) -> Result<(T, Option<WatchEvent>), StoreError>
            + Send
            + 'static,
    ) -> Result<T, StoreError> {
        let (db, changed, events) = (self.db.clone(), self.changed.clone(), self.events.clone());
        let (writer, relaxed) = (self.writer.clone(), self.relaxed.clone());
        // Everything after the commit happens on the blocking thread too, so a caller
        // that goes away mid-write (a client hanging up) cannot leave a committed change
        // unannounced.
        tokio::task::spawn_blocking(move || {
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            let next = w.revision + 1;
            let mut tx = db.begin_write().map_err(unavailable)?;
            tx.set_durability(durability);
            let (out, event) = {
                let mut meta = tx.open_table(META).map_err(unavailable)?;
                let mut kv = tx.open_table(KV).map_err(unavailable)?;
                let (out, event) = f(&mut kv, next, &relaxed)?;
                if event.is_some() {
                    meta.insert("revision", next).map_err(unavailable)?;
                }
                (out, event)
            };
            match event {
                Some(ev) => {
                    tx.commit().map_err(unavailable)?;
                    w.revision = next;
                    // The file has the key's last change now: the journal's is older.
                    relaxed.write().unwrap_or_else(|p| p.into_inner()).remove(&ev.key);
                    // Under the writer lock: watchers see revisions in order.
                    announce(&changed, &events, ev);
                    drop(w);
                }
                None => tx.abort().map_err(unavailable)?,
            }
            Ok::<_, StoreError>(out)
        })
        .await
        .map_err(unavailable)?
    }
}

/// Records a committed change for [`StateStore::prefix_version`] and tells watchers.
/// After the commit: a reader that sees the new version also sees the new data.
fn announce(
    changed: &Mutex<std::collections::HashMap<String, u64>>,
    events: &broadcast::Sender<WatchEvent>,
    ev: WatchEvent,
) {
    let mut changed = changed.lock().unwrap_or_else(|p| p.into_inner());
    let last = changed.entry(first_segment(&ev.key).to_string()).or_default();
    *last = (*last).max(ev.revision);
    drop(changed);
    let _ = events.send(ev);
}

impl EmbeddedStore {
    fn file_get(db: &Database, key: &str) -> Result<Option<Versioned>, StoreError> {
        let tx = db.begin_read().map_err(unavailable)?;
        let kv = tx.open_table(KV).map_err(unavailable)?;
        match kv.get(key).map_err(unavailable)? {
            Some(raw) => Ok(Some(decode(key, raw.value())?)),
            None => Ok(None),
        }
    }

    /// `put_relaxed`: one journal append under the writer lock. Done in place when the
    /// lock is free (an append is one `write` into the page cache, shorter than a hop
    /// to a blocking thread and back); on a blocking thread when a commit holds it.
    async fn journal_put(&self, key: String, value: Vec<u8>) -> Result<u64, StoreError> {
        let (writer, relaxed) = (self.writer.clone(), self.relaxed.clone());
        let (changed, events) = (self.changed.clone(), self.events.clone());
        if let Ok(w) = writer.try_lock() {
            return Self::append_put(w, &relaxed, &changed, &events, key, value);
        }
        tokio::task::spawn_blocking(move || {
            let w = writer.lock().unwrap_or_else(|p| p.into_inner());
            Self::append_put(w, &relaxed, &changed, &events, key, value)
        })
        .await
        .map_err(unavailable)?
    }

    fn append_put(
        mut w: std::sync::MutexGuard<'_, Writer>,
        relaxed: &Relaxed,
        changed: &Mutex<std::collections::HashMap<String, u64>>,
        events: &broadcast::Sender<WatchEvent>,
        key: String,
        value: Vec<u8>,
    ) -> Result<u64, StoreError> {
        let next = w.revision + 1;
        let entry = Entry {
            key,
            revision: next,
            value: Some(value),
        };
        w.journal.append(&entry).map_err(unavailable)?;
        w.revision = next;
        let mut map = relaxed.write().unwrap_or_else(|p| p.into_inner());
        map.insert(entry.key.clone(), (next, entry.value.clone()));
        if w.journal.wants_compaction() {
            let live: Vec<Entry> = map
                .iter()
                .filter_map(|(k, (rev, v))| {
                    v.as_ref().map(|v| Entry {
                        key: k.clone(),
                        revision: *rev,
                        value: Some(v.clone()),
                    })
                })
                .collect();
            // The entry just made is among them: the highest revision survives.
            if let Err(e) = w.journal.rewrite(live.iter()) {
                tracing::warn!("cannot compact the store journal: {e}");
            }
        }
        drop(map);
        // Under the writer lock: watchers see revisions in order.
        announce(
            changed,
            events,
            WatchEvent {
                key: entry.key,
                value: entry.value,
                revision: next,
            },
        );
        drop(w);
        Ok(next)
    }

    /// Deletes a key wherever its last change is (see [`remove_key`]).
    async fn remove(&self, key: String) -> Result<bool, StoreError> {
        let (db, writer, relaxed) = (self.db.clone(), self.writer.clone(), self.relaxed.clone());
        let (changed, events) = (self.changed.clone(), self.events.clone());
        tokio::task::spawn_blocking(move || remove_key(&db, &writer, &relaxed, &changed, &events, key))
            .await
            .map_err(unavailable)?
    }
}

/// Deletes a key wherever its last change is. One held in the journal gets a
/// tombstone there first (readers see it deleted at once); a copy in the file is
/// removed in a durable commit (with its lease mark); then the key leaves the
/// journal's map.
fn remove_key(
    db: &Database,
    writer: &Mutex<Writer>,
    relaxed: &Relaxed,
    changed: &Mutex<std::collections::HashMap<String, u64>>,
    events: &broadcast::Sender<WatchEvent>,
    key: String,
) -> Result<bool, StoreError> {
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    let held = read_relaxed(relaxed, &key);
    let in_file = EmbeddedStore::file_get(db, &key)?;
    if newer(held.clone(), in_file.clone()).is_none() {
        return Ok(false);
    }
    let next = w.revision + 1;
    if held.is_some() {
        w.journal
            .append(&Entry {
                key: key.clone(),
                revision: next,
                value: None,
            })
            .map_err(unavailable)?;
        relaxed
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), (next, None));
    }
    if in_file.is_some() {
        let tx = db.begin_write().map_err(unavailable)?;
        {
            let mut kv = tx.open_table(KV).map_err(unavailable)?;
            kv.remove(key.as_str()).map_err(unavailable)?;
            tx.open_table(LEASED)
                .map_err(unavailable)?
                .remove(key.as_str())
                .map_err(unavailable)?;
            let mut meta = tx.open_table(META).map_err(unavailable)?;
            meta.insert("revision", next).map_err(unavailable)?;
        }
        tx.commit().map_err(unavailable)?;
    }
    w.revision = next;
    if held.is_some() {
        relaxed.write().unwrap_or_else(|p| p.into_inner()).remove(&key);
    }
    // Under the writer lock: watchers see revisions in order.
    announce(
        changed,
        events,
        WatchEvent {
            key,
            value: None,
            revision: next,
        },
    );
    drop(w);
    Ok(true)
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
            let held = read_relaxed(&self.relaxed, key);
            Ok(newer(held, Self::file_get(&self.db, key)?))
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<u64, StoreError>> {
        let key = key.to_string();
        Box::pin(self.write(redb::Durability::Immediate, move |kv, rev, _| {
            stored(kv, key, rev, value)
        }))
    }

    /// Appended to the journal without waiting for the disk: a crash of this process
    /// loses nothing (the kernel has the pages), a crash of the host may lose the last
    /// such writes.
    fn put_relaxed<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(self.journal_put(key.to_string(), value))
    }

    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let key = key.to_string();
        Box::pin(self.write(redb::Durability::Immediate, move |kv, rev, relaxed| {
            let held = read_relaxed(relaxed, &key);
            let in_file = match kv.get(key.as_str()).map_err(unavailable)? {
                Some(raw) => Some(decode(&key, raw.value())?),
                None => None,
            };
            let found = newer(held, in_file).map(|v| v.revision);
            if found != expected {
                return Err(StoreError::Conflict { key, expected, found });
            }
            stored(kv, key, rev, value)
        }))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        let key = key.to_string();
        Box::pin(self.remove(key))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<(String, Versioned)>, StoreError>> {
        Box::pin(async move {
            // The journal's first (see `newer`), then the file's.
            let held: BTreeMap<String, (u64, Option<Vec<u8>>)> = self
                .relaxed
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let tx = self.db.begin_read().map_err(unavailable)?;
            let kv = tx.open_table(KV).map_err(unavailable)?;
            let mut merged: BTreeMap<String, Option<Versioned>> = BTreeMap::new();
            for item in kv.range(prefix..).map_err(unavailable)? {
                let (k, v) = item.map_err(unavailable)?;
                let k = k.value();
                if !k.starts_with(prefix) {
                    break;
                }
                merged.insert(k.to_string(), Some(decode(k, v.value())?));
            }
            for (k, h) in held {
                let file = merged.remove(&k).flatten();
                merged.insert(k, newer(Some(h), file));
            }
            Ok(merged.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect())
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

    /// A lease in this process's memory, lapsing `ttl` after it was last renewed.
    fn grant_lease(&self, ttl: std::time::Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>> {
        self.start_reaper();
        let id = self.leases.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        self.leases.held.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Held {
                ttl,
                deadline: std::time::Instant::now() + ttl,
                keys: Default::default(),
            },
        );
        Box::pin(std::future::ready(Ok(id)))
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<bool, StoreError>> {
        let now = std::time::Instant::now();
        let mut held = self.leases.held.lock().unwrap_or_else(|p| p.into_inner());
        let alive = match held.get_mut(&lease) {
            Some(h) if h.deadline > now => {
                h.deadline = now + h.ttl;
                true
            }
            _ => false,
        };
        Box::pin(std::future::ready(Ok(alive)))
    }

    fn revoke_lease(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        let gone = self
            .leases
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&lease);
        Box::pin(async move {
            for key in gone.map(|h| h.keys).unwrap_or_default() {
                self.remove(key).await?;
            }
            Ok(())
        })
    }

    fn put_leased<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: LeaseId,
        create_only: bool,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let live = |leases: &Leases| {
                leases
                    .held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&lease)
                    .is_some_and(|h| h.deadline > std::time::Instant::now())
            };
            if !live(&self.leases) {
                return Err(StoreError::LeaseLapsed(lease));
            }
            let k = key.to_string();
            let (db, writer, relaxed) = (self.db.clone(), self.writer.clone(), self.relaxed.clone());
            let (changed, events) = (self.changed.clone(), self.events.clone());
            let written = tokio::task::spawn_blocking(move || {
                let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                if create_only && newer(read_relaxed(&relaxed, &k), Self::file_get(&db, &k)?).is_some() {
                    return Ok(None);
                }
                let next = w.revision + 1;
                let tx = db.begin_write().map_err(unavailable)?;
                {
                    let mut kv = tx.open_table(KV).map_err(unavailable)?;
                    store_value(&mut kv, &k, next, &value)?;
                    tx.open_table(LEASED)
                        .map_err(unavailable)?
                        .insert(k.as_str(), ())
                        .map_err(unavailable)?;
                    tx.open_table(META)
                        .map_err(unavailable)?
                        .insert("revision", next)
                        .map_err(unavailable)?;
                }
                tx.commit().map_err(unavailable)?;
                w.revision = next;
                relaxed.write().unwrap_or_else(|p| p.into_inner()).remove(&k);
                announce(
                    &changed,
                    &events,
                    WatchEvent {
                        key: k,
                        value: Some(value),
                        revision: next,
                    },
                );
                drop(w);
                Ok::<_, StoreError>(Some(next))
            })
            .await
            .map_err(unavailable)??;
            if written.is_some() {
                let kept = match self
                    .leases
                    .held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&lease)
                {
                    Some(h) => {
                        h.keys.insert(key.to_string());
                        true
                    }
                    None => false,
                };
                if !kept {
                    // It lapsed while the key was written: the key goes too.
                    self.remove(key.to_string()).await?;
                    return Err(StoreError::LeaseLapsed(lease));
                }
            }
            Ok(written)
        })
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
