//! What every handler and background task can reach: the api's settings, its state
//! store, the daemons' clients (and whether they answer) and the caches and counters
//! shared between requests.
//! It sits at the bottom of the api's import graph: it names the types it holds and
//! nothing that serves a route.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::model::HypervisorKind;
use vmm_manager::client::VmmClient;

use crate::operations::record::Operations;
use crate::store;
use crate::store::StateStore;

/// The api's settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Holds the store, `admin.key`, and (all-in-one) the daemons' state.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Where the daemons' sockets are.
    pub socket_dir: PathBuf,
    /// Daemons reached over TCP with TLS instead (`--daemon NAME=https://…`).
    pub endpoints: std::collections::BTreeMap<String, socket_http::Endpoint>,
    pub default_hypervisor: HypervisorKind,
    /// Where the desired state lives.
    pub store: store::StoreLocation,
    /// Failed authentications per minute from one address before it gets 429s (0: no limit).
    pub auth_failures_per_minute: u32,
    /// How often the reconciler looks for drift while the api serves (zero: only at start).
    pub reconcile_interval: Duration,
    /// The host this api runs on, as the cluster knows it.
    pub host: HostIdentity,
    /// vCPUs VMs may be given per host CPU (`--cpu-allocation-ratio`).
    pub cpu_allocation_ratio: f64,
    /// How long a call waits for a daemon to come back ([`DAEMON_RESTART`] when the
    /// daemons run on their own; zero when they run in this process, where they cannot
    /// restart alone and a stopping daemon must fail calls at once).
    pub daemon_retry: Duration,
}

impl ApiConfig {
    pub fn socket(&self, daemon: &str) -> PathBuf {
        self.socket_dir.join(format!("{daemon}.sock"))
    }

    /// Where `daemon` is reached: its TLS endpoint when one was given, else its socket.
    pub fn endpoint(&self, daemon: &str) -> socket_http::Endpoint {
        self.endpoints
            .get(daemon)
            .cloned()
            .unwrap_or_else(|| socket_http::Endpoint::Unix(self.socket(daemon)))
    }

    /// The client of `daemon`, riding out its restarts for [`ApiConfig::daemon_retry`].
    pub fn client(&self, daemon: &str) -> socket_http::Client {
        socket_http::Client::to(self.endpoint(daemon)).with_retry(self.daemon_retry)
    }
}

/// The host this api runs on: its name (`--host-name`) and the address other hosts
/// reach its daemons at (`--host-address`, with `--daemon-port` the first of the four
/// TLS ports an all-in-one api serves them on).
#[derive(Debug, Clone)]
pub struct HostIdentity {
    pub name: String,
    pub address: Option<std::net::IpAddr>,
    pub daemon_port: u16,
}

impl HostIdentity {
    /// This machine's host name, as a DNS label (its first label, lowercased, with
    /// anything else made a `-`): the default `--host-name`.
    pub fn default_name() -> String {
        let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let label: String = raw
            .trim()
            .split('.')
            .next()
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(63)
            .collect();
        let label = label.trim_matches('-').to_string();
        if label.is_empty() {
            "host".into()
        } else {
            label
        }
    }
}

/// Settings of the daemons `--all-in-one` runs in-process.
#[derive(Debug, Clone)]
pub struct AllInOne {
    pub vmm: vmm_manager::VmmConfig,
    pub netd: netd::network::NetdConfig,
    pub blockd: blockd::BlockdConfig,
    /// Recipe outputs imaged imports on first use (`<dir>/<name>/image.json`).
    pub images_dir: PathBuf,
}

/// A daemon's answer kept for a few seconds ([`HOST_FACTS_TTL`]): host facts (memory,
/// hypervisors, resolvers) change rarely, and asking for them on every VM create cost a
/// round trip to a daemon each time.
pub struct Cached<T> {
    ttl: Duration,
    slot: std::sync::Mutex<Option<(std::time::Instant, T)>>,
}

/// How long host facts are kept.
pub const HOST_FACTS_TTL: Duration = Duration::from_secs(5);

impl<T: Clone> Cached<T> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            slot: std::sync::Mutex::new(None),
        }
    }

    /// The kept answer while it is fresh, else `fetch`'s (kept when it succeeds).
    pub async fn get_or<E, Fut>(&self, fetch: impl FnOnce() -> Fut) -> Result<T, E>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        if let Some((at, v)) = self.slot.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            if at.elapsed() < self.ttl {
                return Ok(v.clone());
            }
        }
        let v = fetch().await?;
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some((std::time::Instant::now(), v.clone()));
        Ok(v)
    }
}

/// What every handler can reach.
pub struct AppState {
    pub config: ApiConfig,
    pub store: Arc<dyn StateStore>,
    pub ops: Operations,
    pub vmm: VmmClient,
    pub images: imaged::client::ImagedClient,
    pub netd: netd::http::client::NetdClient,
    pub blockd: blockd::http::client::BlockdClient,
    pub tickets: crate::console::tickets::Tickets,
    pub events: Arc<crate::events::bus::Events>,
    pub auth_failures: crate::auth::limit::AuthFailures,
    /// vmm-manager's state of every VM, followed by [`crate::vms::live::follow`].
    pub live: Arc<crate::vms::live::LiveVms>,
    /// Rendered `GET /v1/vms` listings.
    pub vm_list: crate::vms::list::ListCache,
    /// The reconcile pass at start, once it ran.
    pub reconciled: std::sync::Mutex<Option<crate::reconcile::report::Pass>>,
    /// This process's identity (random per start): marks the Idempotency-Keys it runs.
    pub instance: String,
    /// Operations the previous api process left running, until the start-time
    /// reconcile pass settles them.
    pub interrupted: std::sync::Mutex<Vec<crate::model::Operation>>,
    /// Totals of the periodic reconcile passes.
    pub drift: crate::reconcile::report::Totals,
    /// vmm-manager's host facts (CPUs, memory, hypervisors), kept briefly.
    pub host_facts: Cached<vmm_manager::spec::HostFacts>,
    /// netd's host facts (the resolvers guests get), kept briefly.
    pub host_network: Cached<netd::http::HostNetwork>,
    /// Whether this api leads the cluster.
    pub presence: crate::hosts::clients::Presence,
    /// Other hosts' daemons, as clients.
    pub remote_hosts: crate::hosts::clients::RemoteHosts,
    /// This host's daemons' TLS endpoints, once served (registered with the host).
    pub host_daemons: std::sync::OnceLock<std::collections::BTreeMap<String, String>>,
}

impl AppState {
    /// Whether each daemon answers its health endpoint (within 2 s).
    pub async fn daemon_health(&self) -> Vec<(&'static str, bool)> {
        let mut out = Vec::new();
        for d in crate::daemons::DAEMONS {
            let client = socket_http::Client::to(self.config.endpoint(d)).with_timeout(Duration::from_secs(2));
            out.push((d, client.get::<serde_json::Value>("/health").await.is_ok()));
        }
        out
    }

    /// Records what vmm-manager answered about a VM in the live view, when the VM is
    /// on this api's host (the view follows this host's vmm-manager only).
    pub fn observe(&self, host: Option<&str>, info: &vmm_manager::spec::VmInfo) {
        if self.is_local(host) {
            self.live.observe(info);
        }
    }

    /// Whether `host` is this api's own (`None`: a record from before hosts were
    /// recorded, made by this host's api).
    pub fn is_local(&self, host: Option<&str>) -> bool {
        host.is_none_or(|h| h == self.config.host.name)
    }

    /// What a VM listing reads.
    pub fn vm_sources(&self) -> crate::vms::list::Sources<'_> {
        crate::vms::list::Sources {
            store: self.store.as_ref(),
            live: &self.live,
            vmm: &self.vmm,
            remote: self,
        }
    }
}

/// How long a call to a daemon waits for it to come back (systemd restarts a daemon
/// that died after 2 s) before the operation fails with 503.
pub const DAEMON_RESTART: Duration = Duration::from_secs(20);

/// Opens the store, makes the admin key, and collects the operations a previous run
/// left running (settled after the start-time reconcile pass).
pub async fn open_state(config: ApiConfig) -> anyhow::Result<Arc<AppState>> {
    std::fs::create_dir_all(&config.data_dir)?;
    let store = store::open(&config.store, &config.data_dir).await?;
    crate::auth::keys::ensure_admin_key(store.as_ref(), &config.data_dir).await?;
    let events = Arc::new(crate::events::bus::Events::default());
    let instance = uuid::Uuid::new_v4().to_string();
    let ops = Operations::new(store.clone(), events.clone(), instance.clone());
    // Other hosts' live apis run their own operations.
    let others = crate::hosts::record::live_instances(store.as_ref(), &config.host.name).await?;
    // Operations the previous process was running: the reconciler finishes or undoes
    // their work, then settles them (before the api serves).
    let interrupted = ops
        .list()
        .await?
        .into_iter()
        .filter(|op| op.status == crate::model::OperationStatus::Running)
        .filter(|op| op.runner.as_ref().is_none_or(|r| !others.contains(r)))
        .collect();
    let auth_limit = config.auth_failures_per_minute;
    Ok(Arc::new(AppState {
        vmm: VmmClient(config.client("vmm-manager")),
        images: imaged::client::ImagedClient(config.client("imaged")),
        netd: netd::http::client::NetdClient(config.client("netd")),
        blockd: blockd::http::client::BlockdClient(
            config
                .client("blockd")
                .with_timeout(std::time::Duration::from_secs(600)),
        ),
        tickets: Default::default(),
        events,
        config,
        store,
        ops,
        auth_failures: crate::auth::limit::AuthFailures::new(auth_limit),
        live: Default::default(),
        vm_list: Default::default(),
        reconciled: Default::default(),
        instance,
        interrupted: std::sync::Mutex::new(interrupted),
        drift: Default::default(),
        host_facts: Cached::new(HOST_FACTS_TTL),
        host_network: Cached::new(HOST_FACTS_TTL),
        presence: Default::default(),
        remote_hosts: Default::default(),
        host_daemons: Default::default(),
    }))
}
