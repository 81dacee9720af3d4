//! The etcd store, for several hosts sharing one desired state: `--store
//! etcd://host:port[,host:port…][/prefix]`. Keys live under a prefix (`hearth/` by
//! default) so one etcd cluster can serve other programs too.
//!
//! etcd's own revisions are the store's: a key's revision is its `mod_revision`, and
//! compare-and-swap is a transaction comparing it. Every request has a deadline, so a
//! stopped etcd turns into [`StoreError::Unavailable`] (503) within seconds, and the
//! client reconnects by itself when etcd returns. A background task follows etcd's
//! watch from the revision it last saw, so a broken watch stream loses no change.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use futures_util::future::BoxFuture;
use tokio::sync::broadcast;

use super::{LeaseId, StateStore, StoreError, Versioned, WatchEvent};

/// Where an etcd store lives, parsed from `etcd://host:port[,host:port…][/prefix]`.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdTarget {
    pub endpoints: Vec<String>,
    pub prefix: String,
}

impl std::str::FromStr for EtcdTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("{s:?}: an etcd store reads etcd://host:port[,host:port…][/prefix]"))?;
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, p.trim_matches('/')),
            None => (rest, "hearth"),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| {
                let (host, port) = h
                    .rsplit_once(':')
                    .ok_or_else(|| format!("{h:?}: an etcd endpoint needs host:port"))?;
                port.parse::<u16>()
                    .map_err(|_| format!("{h:?}: {port:?} is not a port"))?;
                if host.is_empty() {
                    return Err(format!("{h:?}: an etcd endpoint needs a host"));
                }
                Ok(format!("http://{h}"))
            })
            .collect::<Result<_, String>>()?;
        if endpoints.is_empty() {
            return Err(format!("{s:?}: no etcd endpoint"));
        }
        if prefix.is_empty() || prefix.chars().any(|c| c.is_control()) {
            return Err(format!("{s:?}: the key prefix must be a non-empty printable path"));
        }
        Ok(Self {
            endpoints,
            prefix: format!("{prefix}/"),
        })
    }
}

/// An etcd-backed [`StateStore`].
pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: String,
    events: broadcast::Sender<WatchEvent>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// How long one request may take before the store reports etcd unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// How many more times a request may go after `e` when it never left: no connection
/// to the member the client picked (one that is down, while the others may be up).
fn not_sent(e: &etcd_client::Error) -> u32 {
    let s = e.to_string();
    if s.contains("connect error") || s.contains("Connection refused") {
        4
    } else {
        0
    }
}

/// How many more times a request that does the same when run twice may go after `e`:
/// as [`not_sent`], and while etcd's members elect a leader; once more when etcd did
/// not answer within the request's deadline (a member stalled on its disk a moment).
fn retry_same(e: &etcd_client::Error) -> u32 {
    let s = e.to_string();
    if s.contains("leader changed") {
        4
    } else if s.contains("Timeout expired") {
        1
    } else {
        not_sent(e)
    }
}

impl EtcdStore {
    /// Runs `request` with a client, again (up to five times in all, 0.1 to 0.8 s apart) when
    /// it could not be sent: with several members, one down makes the client's pick
    /// of it fail before the next pick reaches a live one. A request that was sent is
    /// never repeated (a compare-and-swap must not run twice).
    async fn call<T, Fut>(&self, request: impl Fn(Client) -> Fut) -> Result<T, etcd_client::Error>
    where
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_with(not_sent, request).await
    }

    /// [`EtcdStore::call`] for a request that does the same when run twice (a read, a
    /// plain write, a delete, a lease renewal): also again while etcd elects a leader,
    /// for up to about a second.
    async fn call_same<T, Fut>(&self, request: impl Fn(Client) -> Fut) -> Result<T, etcd_client::Error>
    where
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_with(retry_same, request).await
    }

    async fn call_with<T, Fut>(
        &self,
        again: fn(&etcd_client::Error) -> u32,
        request: impl Fn(Client) -> Fut,
    ) -> Result<T, etcd_client::Error>
    where
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 0;
        loop {
            match request(self.client.clone()).await {
                Err(e) if attempt < again(&e) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                other => return other,
            }
        }
    }

    /// A range request over every key under `prefix`, with `options` (a prefix range).
    async fn range(&self, prefix: &str, options: GetOptions) -> Result<etcd_client::GetResponse, StoreError> {
        let key = self.key(prefix);
        self.call_same(|c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.kv_client().get(key, Some(options.with_prefix())).await }
        })
        .await
        .map_err(|e| self.unavailable(e))
    }

    /// Connects (lazily: an etcd that is down now makes requests fail until it is up)
    /// and starts following changes under the prefix.
    pub async fn connect(target: &EtcdTarget) -> Result<Self, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        let endpoints = target.endpoints.join(",");
        let client = Client::connect(&target.endpoints, Some(options))
            .await
            .map_err(|e| StoreError::Unavailable(format!("etcd at {endpoints}: {e}")))?;
        let events = broadcast::channel(4096).0;
        // Changes are reported from the revision current now, however late the watch
        // stream itself is set up (when etcd is down now: from when it is back).
        let start = client
            .kv_client()
            .get(target.prefix.clone(), Some(GetOptions::new().with_count_only()))
            .await
            .ok()
            .and_then(|r| r.header().map(|h| h.revision() + 1));
        let watcher = tokio::spawn(follow(client.clone(), target.prefix.clone(), start, events.clone()));
        Ok(Self {
            client,
            prefix: target.prefix.clone(),
            endpoints,
            events,
            watcher,
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn unavailable(&self, e: etcd_client::Error) -> StoreError {
        StoreError::Unavailable(format!("etcd at {} did not answer: {e}", self.endpoints))
    }

    fn versioned(&self, key: &str, kv: &etcd_client::KeyValue) -> Result<Versioned, StoreError> {
        Ok(Versioned {
            value: kv.value().to_vec(),
            revision: revision(key, kv.mod_revision())?,
        })
    }
}

fn revision(key: &str, r: i64) -> Result<u64, StoreError> {
    u64::try_from(r).map_err(|_| StoreError::Corrupt {
        key: key.to_string(),
        message: format!("etcd reported revision {r}"),
    })
}

fn header_revision(key: &str, header: Option<&etcd_client::ResponseHeader>) -> Result<u64, StoreError> {
    revision(key, header.map(|h| h.revision()).unwrap_or(-1))
}

impl StateStore for EtcdStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Versioned>, StoreError>> {
        Box::pin(async move {
            let full = self.key(key);
            let resp = self
                .call_same(|c| {
                    let full = full.clone();
                    async move { c.kv_client().get(full, None).await }
                })
                .await
                .map_err(|e| self.unavailable(e))?;
            resp.kvs().first().map(|kv| self.versioned(key, kv)).transpose()
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let full = self.key(key);
            let resp = self
                .call_same(|c| {
                    let (full, value) = (full.clone(), value.clone());
                    async move { c.kv_client().put(full, value, None).await }
                })
                .await
                .map_err(|e| self.unavailable(e))?;
            header_revision(key, resp.header())
        })
    }

    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let full = self.key(key);
            let compare = match expected {
                // version 0: the key does not exist.
                None => Compare::version(full.clone(), CompareOp::Equal, 0),
                Some(r) => Compare::mod_revision(
                    full.clone(),
                    CompareOp::Equal,
                    i64::try_from(r).map_err(|_| StoreError::Conflict {
                        key: key.to_string(),
                        expected,
                        found: None,
                    })?,
                ),
            };
            let txn = Txn::new()
                .when([compare])
                .and_then([TxnOp::put(full.clone(), value, None)])
                .or_else([TxnOp::get(full, None)]);
            let resp = self
                .call(|c| {
                    let txn = txn.clone();
                    async move { c.kv_client().txn(txn).await }
                })
                .await
                .map_err(|e| self.unavailable(e))?;
            if resp.succeeded() {
                return header_revision(key, resp.header());
            }
            let found = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.mod_revision())),
                _ => None,
            });
            Err(StoreError::Conflict {
                key: key.to_string(),
                expected,
                found: found.flatten().and_then(|r| u64::try_from(r).ok()),
            })
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let full = self.key(key);
            let resp = self
                .call_same(|c| {
                    let full = full.clone();
                    async move { c.kv_client().delete(full, None).await }
                })
                .await
                .map_err(|e| self.unavailable(e))?;
            Ok(resp.deleted() > 0)
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<(String, Versioned)>, StoreError>> {
        Box::pin(async move {
            let options = GetOptions::new().with_sort(SortTarget::Key, SortOrder::Ascend);
            let resp = self.range(prefix, options).await?;
            resp.kvs()
                .iter()
                .map(|kv| {
                    let full = String::from_utf8_lossy(kv.key());
                    let key = full.strip_prefix(&self.prefix).unwrap_or(&full).to_string();
                    let v = self.versioned(&key, kv)?;
                    Ok((key, v))
                })
                .collect()
        })
    }

    fn watch(&self) -> broadcast::Receiver<WatchEvent> {
        self.events.subscribe()
    }

    /// One range request for the key with the highest `mod_revision` under the prefix,
    /// keys only: a write moves that maximum, a delete lowers the count (etcd counts
    /// every key in the range whatever the limit).
    fn prefix_version<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<super::PrefixVersion, StoreError>> {
        Box::pin(async move {
            let options = GetOptions::new()
                .with_keys_only()
                .with_sort(SortTarget::Mod, SortOrder::Descend)
                .with_limit(1);
            let resp = self.range(prefix, options).await?;
            Ok(super::PrefixVersion {
                count: u64::try_from(resp.count()).unwrap_or(0),
                revision: resp
                    .kvs()
                    .first()
                    .and_then(|kv| u64::try_from(kv.mod_revision()).ok())
                    .unwrap_or(0),
            })
        })
    }

    /// etcd's own lease, of `ttl` rounded up to whole seconds (2 s at least).
    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>> {
        Box::pin(async move {
            let secs = i64::try_from(ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX).max(2);
            let resp = self
                .call(|c| async move { c.lease_client().grant(secs, None).await })
                .await
                .map_err(|e| self.unavailable(e))?;
            Ok(resp.id())
        })
    }

    /// One keep-alive exchange: etcd answers with the lease's new TTL, or says it is gone.
    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            match self
                .call(|c| async move { c.lease_client().keep_alive(lease).await })
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if lease_gone(&e) => Ok(false),
                Err(e) => Err(self.unavailable(e)),
            }
        })
    }

    fn revoke_lease(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            match self
                .call_same(|c| async move { c.lease_client().revoke(lease).await })
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if lease_gone(&e) => Ok(()),
                Err(e) => Err(self.unavailable(e)),
            }
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
            let full = self.key(key);
            let put = TxnOp::put(full.clone(), value, Some(PutOptions::new().with_lease(lease)));
            let txn = if create_only {
                Txn::new()
                    .when([Compare::version(full, CompareOp::Equal, 0)])
                    .and_then([put])
            } else {
                Txn::new().and_then([put])
            };
            let sent = self
                .call(|c| {
                    let txn = txn.clone();
                    async move { c.kv_client().txn(txn).await }
                })
                .await;
            match sent {
                Ok(resp) if resp.succeeded() => header_revision(key, resp.header()).map(Some),
                Ok(_) => Ok(None),
                Err(e) if lease_gone(&e) => Err(StoreError::LeaseLapsed(lease)),
                Err(e) => Err(self.unavailable(e)),
            }
        })
    }
}

/// Whether etcd's error says the lease is gone (lapsed, revoked or never granted).
fn lease_gone(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        _ => false,
    }
}

/// Follows etcd's changes under `prefix` into `events` for as long as the store lives.
/// After a broken stream it resumes from the revision after the last one it passed on.
async fn follow(client: Client, prefix: String, mut next: Option<i64>, events: broadcast::Sender<WatchEvent>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut options = WatchOptions::new().with_prefix();
        if let Some(r) = next {
            options = options.with_start_revision(r);
        }
        match client.watch_client().watch(prefix.clone(), Some(options)).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        backoff = Duration::from_millis(100);
                        if resp.canceled() {
                            // Compacted past our revision: what was missed is gone;
                            // carry on from now.
                            tracing::warn!(reason = resp.cancel_reason(), "etcd cancelled the store's watch");
                            next = None;
                            break;
                        }
                        if next.is_none() {
                            next = resp.header().map(|h| h.revision() + 1);
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let full = String::from_utf8_lossy(kv.key());
                            let key = full.strip_prefix(&prefix).unwrap_or(&full).to_string();
                            let deleted = ev.event_type() == etcd_client::EventType::Delete;
                            let _ = events.send(WatchEvent {
                                key,
                                value: (!deleted).then(|| kv.value().to_vec()),
                                revision: u64::try_from(kv.mod_revision()).unwrap_or(0),
                            });
                            next = Some(kv.mod_revision() + 1);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!("etcd watch stream broke: {e}");
                        break;
                    }
                }
            },
            Err(e) => tracing::debug!("cannot watch etcd: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
