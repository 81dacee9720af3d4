//! The crash storm: the api and each daemon run as processes of their own (as the
//! systemd units run them). 50 VM, network, volume and database creates and deletes
//! run at once
//! while the api, vmm-manager, netd, blockd and imaged are each killed (-9) twice, at
//! random moments, and started again. The clients behave as a careful client would:
//! POSTs carry an Idempotency-Key, a request the api could not answer (it was down,
//! or said 5xx) is sent again, an accepted operation is followed to its end, and one
//! the api undid because it restarted ("retry it") is made again.
//!
//! Afterwards every operation has finished (succeeded, or failed with a message), and
//! what the api shows is exactly what the daemons and the host hold: every VM has its
//! VMM definition, port and root disk and nothing else has any; every QEMU process is
//! a running VM's; every TAP is a port's, every bridge a network's, every address a
//! port's; every volume file is a volume's; every database is whole (ready, its VM
//! running with its data volume attached, answering a query over TLS with its password)
//! and every database VM and volume is a database's. Each request's answer agrees with the end
//! state (a succeeded create is there, a succeeded delete is gone). Deleting
//! everything then leaves no process, TAP, bridge, address or file. The schedule is
//! random; `HEARTH_STORM_SEED` repeats one (the seed is printed).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{in_private_netns, ApiClient, Etcd, Stack, DAEMONS};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use socket_http::UnixClient;

#[test]
fn storm_on_embedded_store() {
    in_private_netns(|| storm(None));
}

#[test]
fn storm_on_etcd() {
    in_private_netns(|| async { storm(Some(Etcd::start(12379, 12380))).await });
}

/// One request of the storm.
#[derive(Debug, Clone)]
enum Change {
    CreateVm {
        name: String,
        start: bool,
        volume: Option<String>,
    },
    DeleteVm(String),
    CreateNetwork {
        name: String,
        subnet: String,
    },
    DeleteNetwork(String),
    CreateVolume(String),
    DeleteVolume(String),
    CreateDatabase(String),
    DeleteDatabase(String),
}

impl Change {
    fn request(&self) -> (&'static str, String, Option<Value>) {
        match self {
            Change::CreateVm { name, start, volume } => {
                let mut body = common::create_body(name, "qemu");
                body["start"] = json!(start);
                if let Some(v) = volume {
                    body["volumes"] = json!([{"volume": v}]);
                }
                ("POST", "/v1/vms".into(), Some(body))
            }
            Change::DeleteVm(name) => ("DELETE", format!("/v1/vms/{name}"), None),
            Change::CreateNetwork { name, subnet } => (
                "POST",
                "/v1/networks".into(),
                Some(json!({"name": name, "subnet": subnet})),
            ),
            Change::DeleteNetwork(name) => ("DELETE", format!("/v1/networks/{name}"), None),
            Change::CreateVolume(name) => (
                "POST",
                "/v1/volumes".into(),
                Some(json!({"name": name, "size_bytes": 4 << 20})),
            ),
            Change::DeleteVolume(name) => ("DELETE", format!("/v1/volumes/{name}"), None),
            Change::CreateDatabase(name) => (
                "POST",
                "/v1/databases".into(),
                Some(json!({"name": name, "storage": "1G", "memory_mib": 768, "vcpus": 1})),
            ),
            Change::DeleteDatabase(name) => ("DELETE", format!("/v1/databases/{name}"), None),
        }
    }
}

/// How a request ended: the final status, its body, and for a 202 the operation as it
/// finished.
#[derive(Debug)]
struct Outcome {
    change: Change,
    status: u16,
    body: Value,
    operation: Option<Value>,
    /// Attempts the client had to make (api down, 5xx, "still being processed").
    attempts: u32,
}

impl Outcome {
    /// Whether the api said the change was done.
    fn succeeded(&self) -> bool {
        match self.status {
            201 | 204 => true,
            202 => self.operation.as_ref().is_some_and(|o| o["status"] == "succeeded"),
            _ => false,
        }
    }
}

/// Sends one change the way a careful client does, until it has a final answer.
async fn send(client: ApiClient, change: Change, deadline: Instant) -> Outcome {
    let (method, path, body) = change.request();
    let bytes = body.map(|b| b.to_string().into_bytes());
    let mut idempotency = uuid::Uuid::new_v4().to_string();
    let mut attempts = 0;
    loop {
        assert!(Instant::now() < deadline, "{change:?}: no final answer in time");
        attempts += 1;
        let headers: Vec<(&str, &str)> = if method == "POST" {
            vec![("idempotency-key", idempotency.as_str())]
        } else {
            Vec::new()
        };
        let answer = client
            .request_with(method, &path, bytes.as_deref(), Some(&client.key), &headers)
            .await;
        let (status, body) = match answer {
            Ok((status, _, body)) => (status, body),
            // The api is down (killed); it is started again.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let message = body["error"]["message"].as_str().unwrap_or_default();
        let again = status >= 500
            || (status == 409 && message.contains("still being processed"))
            // A delete while another operation (an earlier attempt) runs on the VM.
            || (status == 409 && method == "DELETE" && message.contains("operation"));
        if again {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let operation = match status {
            202 => Some(follow(&client, &body, deadline).await),
            _ => None,
        };
        let undone_by_restart = operation.as_ref().is_some_and(|op| {
            op["status"] == "failed" && op["error"]["message"].as_str().is_some_and(|m| m.contains("retry it"))
        });
        if undone_by_restart {
            // The api said so: the work was undone, the request may be made again (a
            // new request, so a new key).
            idempotency = uuid::Uuid::new_v4().to_string();
            continue;
        }
        return Outcome {
            change,
            status,
            body,
            operation,
            attempts,
        };
    }
}

/// Follows an accepted operation to its end, across api restarts.
async fn follow(client: &ApiClient, accepted: &Value, deadline: Instant) -> Value {
    let id = accepted["operation"]["id"].as_str().expect("operation id");
    loop {
        assert!(Instant::now() < deadline, "operation {id} did not finish");
        match client
            .request_with(
                "GET",
                &format!("/v1/operations/{id}?wait=5"),
                None,
                Some(&client.key),
                &[],
            )
            .await
        {
            Ok((200, _, op)) if op["status"] != "running" => return op,
            Ok((200, _, _)) => {}
            Ok((status, _, body)) => panic!("operation {id}: {status} {body}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Sends `changes` at once and asserts each succeeded (setup and teardown).
async fn all_succeed(client: &ApiClient, changes: impl IntoIterator<Item = Change>, deadline: Instant, what: &str) {
    let sent = changes.into_iter().map(|c| send(client.clone(), c, deadline));
    for o in futures_util::future::join_all(sent).await {
        assert!(o.succeeded(), "{what}: {o:?}");
    }
}

/// The names of networks as netd and the api show them (`spec.name`).
fn network_names(nets: &[Value]) -> BTreeSet<String> {
    nets.iter()
        .map(|n| n["spec"]["name"].as_str().expect("name").to_string())
        .collect()
}

/// A 409 saying the name is taken.
fn already_exists(o: &Outcome) -> bool {
    o.status == 409
        && o.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("already exists"))
}

fn daemon(stack: &Stack, name: &str) -> UnixClient {
    UnixClient::new(stack.data_dir().join(format!("run/{name}.sock")))
}

async fn list(stack: &Stack, path: &str) -> Vec<Value> {
    let (status, body) = stack.call("GET", path, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    body.as_array().cloned().unwrap_or_else(|| panic!("{path}: {body}"))
}

fn names(items: &[Value], field: &str) -> BTreeSet<String> {
    items
        .iter()
        .map(|v| {
            v[field]
                .as_str()
                .unwrap_or_else(|| panic!("{field} in {v}"))
                .to_string()
        })
        .collect()
}

/// Interfaces in the test's network namespace: (name, is a TAP).
fn interfaces() -> Vec<(String, bool)> {
    std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let tap = e.path().join("tun_flags").exists();
            (name, tap)
        })
        .collect()
}

/// Names of the files in `dir` (none when it does not exist).
fn files(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// What the api shows equals what the daemons and the host hold. Returns the VMs.
async fn check_consistent(stack: &Stack, addresses_per_empty_network: usize) -> Vec<Value> {
    let (vmm, netd, blockd) = (
        daemon(stack, "vmm-manager"),
        daemon(stack, "netd"),
        daemon(stack, "blockd"),
    );
    let ops = list(stack, "/v1/operations").await;
    for op in &ops {
        assert_ne!(op["status"], "running", "every operation finished: {op}");
        if op["status"] == "failed" {
            assert!(
                op["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
                "a failed operation says why: {op}"
            );
        }
    }

    // A VM whose VMM was just launched or told to stop settles first.
    let settle = Instant::now() + Duration::from_secs(60);
    let vms = loop {
        let vms = list(stack, "/v1/vms").await;
        let moving = vms
            .iter()
            .any(|v| ["starting", "stopping"].contains(&v["state"].as_str().unwrap_or_default()));
        if !moving || Instant::now() > settle {
            break vms;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ids = names(&vms, "id");
    let defined: Vec<Value> = vmm.get("/vms").await.expect("vmm-manager lists");
    let defined_ids: BTreeSet<String> = defined
        .iter()
        .map(|v| v["spec"]["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(defined_ids, ids, "vmm-manager holds exactly the VMs the api shows");
    let mut running_pids = BTreeSet::new();
    for vm in &vms {
        let state = vm["state"].as_str().unwrap_or_default();
        assert!(["running", "stopped", "failed"].contains(&state), "{vm}");
        if state == "failed" {
            assert!(vm["reason"].as_str().is_some_and(|r| !r.is_empty()), "{vm}");
        }
        if state == "running" {
            running_pids.insert(vm["pid"].as_u64().expect("a running VM has a pid") as u32);
        }
    }
    let vmm_pids: BTreeSet<u32> = stack.vmm_processes().into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        vmm_pids,
        running_pids,
        "every VMM process is a running VM's: {:?}",
        stack.vmm_processes()
    );

    // Ports: every VM has its port, no port names a VM that is not there.
    let ports: Vec<Value> = netd.get("/ports").await.expect("netd lists ports");
    let port_ids = names(&ports, "id");
    let vm_ports: BTreeSet<String> = port_ids
        .iter()
        .filter(|p| {
            p.rsplit_once('-')
                .is_some_and(|(id, _)| uuid::Uuid::parse_str(id).is_ok())
        })
        .cloned()
        .collect();
    let wanted: BTreeSet<String> = ids.iter().map(|id| format!("{id}-0")).collect();
    assert_eq!(vm_ports, wanted, "one port per VM, none without its VM");

    // Every TAP is a port's; every bridge a network's; every address a port's.
    let taps: BTreeSet<String> = interfaces().into_iter().filter(|(_, t)| *t).map(|(n, _)| n).collect();
    assert_eq!(taps, names(&ports, "tap"), "TAPs on the host are exactly the ports'");
    let nets: Vec<Value> = netd.get("/networks").await.expect("netd lists networks");
    let api_nets = list(stack, "/v1/networks").await;
    assert_eq!(names(&nets, "bridge").len(), nets.len(), "one bridge per network");
    assert_eq!(
        network_names(&nets),
        network_names(&api_nets),
        "netd holds exactly the api's networks"
    );
    let bridges: BTreeSet<String> = interfaces()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("hbr-"))
        .collect();
    assert_eq!(
        bridges,
        names(&nets, "bridge"),
        "bridges on the host are exactly the networks'"
    );
    for n in &nets {
        let on_it = ports.iter().filter(|p| p["network"] == n["spec"]["name"]).count();
        assert_eq!(
            n["allocated"].as_u64().expect("allocated") as usize,
            on_it + addresses_per_empty_network,
            "addresses in use on {} are its ports' (no leaked address): {n}",
            n["spec"]["name"]
        );
    }

    // Volumes: the api's, plus the VMs' root disks; their files and nothing else.
    let volumes: Vec<Value> = blockd.get("/volumes").await.expect("blockd lists");
    let mut wanted = names(&list(stack, "/v1/volumes").await, "name");
    for vm in &vms {
        if vm.get("root_disk").is_some_and(|d| !d.is_null()) {
            wanted.insert(format!("vm-{}-root", vm["id"].as_str().expect("id")));
        }
    }
    assert_eq!(
        names(&volumes, "name"),
        wanted,
        "blockd holds the api's volumes and root disks"
    );
    let stems: BTreeSet<String> = files(&stack.data_dir().join("volumes/volumes"))
        .into_iter()
        .map(|f| f.rsplit_once('.').map(|(s, _)| s.to_string()).unwrap_or(f))
        .collect();
    assert_eq!(stems, wanted, "every file in the pool is a volume's");

    // A volume is attached exactly to the VM whose record names it.
    let api_volumes = list(stack, "/v1/volumes").await;
    for v in &api_volumes {
        let name = v["name"].as_str().expect("name");
        let holders: Vec<&Value> = vms
            .iter()
            .filter(|vm| {
                vm["volumes"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["volume"] == name))
            })
            .collect();
        match (v.get("attached_to"), holders.as_slice()) {
            (None, []) => {}
            (Some(a), [vm]) => assert_eq!(a["vm"], vm["id"], "{name} is attached to the VM naming it: {v}"),
            (a, h) => panic!("volume {name}: attached_to {a:?}, named by {h:?}"),
        }
    }
    // Databases: each whole (ready, its VM running, its data volume attached to that
    // VM), and every database VM and data volume a listed database's.
    let dbs = list(stack, "/v1/databases").await;
    for db in &dbs {
        assert_eq!(db["state"], "running", "a database is whole or gone: {db}");
        let vm = vms
            .iter()
            .find(|v| v["name"] == db["vm"])
            .unwrap_or_else(|| panic!("database without its VM: {db}"));
        assert_eq!(vm["state"], "running", "{db}: {vm}");
        let volume = api_volumes
            .iter()
            .find(|v| v["name"] == db["volume"])
            .unwrap_or_else(|| panic!("database without its volume: {db}"));
        assert_eq!(volume["attached_to"]["vm"], vm["id"], "{db}: {volume}");
    }
    let managed: BTreeSet<String> = vms
        .iter()
        .filter_map(|v| v["managed_by"].as_str().map(str::to_string))
        .collect();
    let db_names = names(&dbs, "name");
    let owners: BTreeSet<String> = db_names.iter().map(|n| format!("database/{n}")).collect();
    assert_eq!(managed, owners, "every database VM is a listed database's");
    let data_volumes: BTreeSet<String> = names(&api_volumes, "name")
        .into_iter()
        .filter(|v| v.starts_with("db-") && v.ends_with("-data"))
        .collect();
    let wanted_data: BTreeSet<String> = dbs
        .iter()
        .map(|d| d["volume"].as_str().expect("volume").to_string())
        .collect();
    assert_eq!(data_volumes, wanted_data, "every data volume is a listed database's");

    // Every dnsmasq is a network's DHCP server (none left by a netd that was killed).
    let dhcp: BTreeSet<u64> = nets.iter().filter_map(|n| n["dhcp_pid"].as_u64()).collect();
    for (pid, cmd) in stack.processes_using_data_dir() {
        if cmd.contains("dnsmasq") {
            assert!(dhcp.contains(&(pid as u64)), "dnsmasq {pid} serves no network: {cmd}");
        }
    }
    vms
}

async fn storm(etcd: Option<Etcd>) {
    let seed: u64 = std::env::var("HEARTH_STORM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let store = etcd.as_ref().map(|e| e.store_url());
    eprintln!(
        "crash storm on {}: HEARTH_STORM_SEED={seed}",
        store.as_deref().unwrap_or("the embedded store")
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let args: Vec<&str> = store.as_deref().map(|u| vec!["--store", u]).unwrap_or_default();
    assert!(
        common::images_dir().join("postgres/image.json").is_file(),
        "the postgres image is missing: run guest-images/postgres/build.sh (scripts/test.sh does)"
    );
    let mut stack = Stack::start_separate(&args).await;

    // The default network with no port yet: how many addresses a network takes for
    // itself (its gateway).
    let netd_client = daemon(&stack, "netd");
    let default: Value = netd_client.get("/networks/default").await.expect("default network");
    let per_network = default["allocated"].as_u64().expect("allocated") as usize;

    // What the storm deletes: 8 VMs (3 running), 6 networks, 4 volumes, a database.
    let mut setup = Vec::new();
    // Volumes attached to VMs of the setup and of the storm.
    for i in 0..8 {
        setup.push(Change::CreateVolume(format!("att{i}")));
    }
    let deadline = Instant::now() + Duration::from_secs(420);
    let client = stack.client();
    all_succeed(&client, setup.drain(..), deadline, "setup").await;
    for i in 0..8 {
        setup.push(Change::CreateVm {
            name: format!("old{i}"),
            start: i % 3 == 0,
            volume: (i < 4).then(|| format!("att{i}")),
        });
    }
    for i in 0..6 {
        setup.push(Change::CreateNetwork {
            name: format!("oldnet{i}"),
            subnet: format!("10.100.{i}.0/24"),
        });
    }
    for i in 0..4 {
        setup.push(Change::CreateVolume(format!("oldvol{i}")));
    }
    all_succeed(&client, setup, deadline, "setup").await;
    // A database the storm deletes (its first boot takes a while under TCG).
    let olddb = send(client.clone(), Change::CreateDatabase("olddb".into()), deadline).await;
    assert!(olddb.succeeded(), "setup: {olddb:?}");

    // The storm: 50 changes at once.
    let mut changes = Vec::new();
    for i in 0..14 {
        changes.push(Change::CreateVm {
            name: format!("vm{i}"),
            start: i % 3 == 0,
            volume: (i < 4).then(|| format!("att{}", i + 4)),
        });
    }
    for i in 0..8 {
        changes.push(Change::DeleteVm(format!("old{i}")));
    }
    for i in 0..10 {
        changes.push(Change::CreateNetwork {
            name: format!("net{i}"),
            subnet: format!("10.101.{i}.0/24"),
        });
    }
    for i in 0..6 {
        changes.push(Change::DeleteNetwork(format!("oldnet{i}")));
    }
    for i in 0..5 {
        changes.push(Change::CreateVolume(format!("vol{i}")));
    }
    for i in 0..4 {
        changes.push(Change::DeleteVolume(format!("oldvol{i}")));
    }
    for i in 0..2 {
        changes.push(Change::CreateDatabase(format!("db{i}")));
    }
    changes.push(Change::DeleteDatabase("olddb".into()));
    assert_eq!(changes.len(), 50);
    let mut victims: Vec<&str> = ["api"].into_iter().chain(DAEMONS).collect();
    victims.extend(victims.clone());
    // Shuffle by the seed.
    for i in (1..victims.len()).rev() {
        victims.swap(i, rng.random_range(0..=i));
    }
    let pauses: Vec<u64> = victims.iter().map(|_| rng.random_range(0..400)).collect();

    let started = Instant::now();
    let storm = futures_util::future::join_all(changes.iter().cloned().map(|c| send(client.clone(), c, deadline)));
    let chaos = async {
        let mut log = Vec::new();
        for (victim, pause) in victims.iter().zip(&pauses) {
            tokio::time::sleep(Duration::from_millis(*pause)).await;
            let at = started.elapsed();
            if *victim == "api" {
                stack.restart(libc::SIGKILL).await;
            } else {
                let daemons = stack.daemons.as_mut().expect("separate daemons");
                daemons.kill(victim, libc::SIGKILL);
                daemons.spawn(victim).await;
            }
            log.push(format!(
                "{victim} at {} ms (back after {} ms)",
                at.as_millis(),
                (started.elapsed() - at).as_millis()
            ));
        }
        log
    };
    let (outcomes, log) = tokio::join!(storm, chaos);
    eprintln!(
        "kills: {}; all 50 answered after {:.1} s",
        log.join(", "),
        started.elapsed().as_secs_f64()
    );
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for o in &outcomes {
        let kind = format!("{:?}", o.change)
            .split([' ', '('])
            .next()
            .unwrap_or_default()
            .to_string();
        let result = if o.succeeded() {
            "done"
        } else {
            o.operation
                .as_ref()
                .map(|_| "failed")
                .unwrap_or(if o.status == 404 { "404" } else { "refused" })
        };
        *tally.entry(format!("{kind} {result}")).or_default() += 1;
    }
    eprintln!(
        "outcomes: {tally:?}; retried requests: {}",
        outcomes.iter().filter(|o| o.attempts > 1).count()
    );
    for o in outcomes.iter().filter(|o| !o.succeeded()) {
        let message = o
            .operation
            .as_ref()
            .map(|op| &op["error"]["message"])
            .unwrap_or(&o.body["error"]["message"]);
        eprintln!("  {:?}: {} {message}", o.change, o.status);
    }

    let vms = check_consistent(&stack, per_network).await;
    let vm_names = names(&vms, "name");
    let net_names = network_names(&list(&stack, "/v1/networks").await);
    let vol_names = names(&list(&stack, "/v1/volumes").await, "name");
    let db_names = names(&list(&stack, "/v1/databases").await, "name");
    for o in &outcomes {
        let what = format!("{o:?}");
        match &o.change {
            Change::CreateVm { name, .. } => {
                assert!([202, 409].contains(&o.status), "{what}");
                if o.succeeded() {
                    assert!(vm_names.contains(name), "a VM whose create succeeded is there: {what}");
                }
                if o.status == 409 {
                    // An earlier attempt made it; the api died before it could keep
                    // the answer for the Idempotency-Key.
                    assert!(already_exists(o), "{what}");
                    assert!(vm_names.contains(name), "{what}");
                }
            }
            Change::DeleteVm(name) => {
                assert!([202, 404].contains(&o.status), "{what}");
                if o.succeeded() || o.status == 404 {
                    assert!(!vm_names.contains(name), "a deleted VM is gone: {what}");
                }
            }
            Change::CreateNetwork { name, .. } => {
                // 409: an earlier attempt made it, its answer lost with the api.
                assert!([201, 409].contains(&o.status), "{what}");
                assert!(o.status == 201 || already_exists(o), "{what}");
                assert!(net_names.contains(name), "{what}");
            }
            Change::DeleteNetwork(name) => {
                assert!([204, 404].contains(&o.status), "{what}");
                assert!(!net_names.contains(name), "{what}");
            }
            Change::CreateVolume(name) => {
                assert!([201, 409].contains(&o.status), "{what}");
                assert!(o.status == 201 || already_exists(o), "{what}");
                assert!(vol_names.contains(name), "{what}");
            }
            Change::DeleteVolume(name) => {
                assert!([204, 404].contains(&o.status), "{what}");
                assert!(!vol_names.contains(name), "{what}");
            }
            Change::CreateDatabase(name) => {
                assert!([202, 409].contains(&o.status), "{what}");
                if o.succeeded() {
                    assert!(
                        db_names.contains(name),
                        "a database whose create succeeded is there: {what}"
                    );
                    let password = o.body["database"]["password"].as_str().expect("the password, once");
                    assert_answers(&stack, name, password).await;
                } else if o.status == 409 {
                    assert!(already_exists(o), "{what}");
                    assert!(db_names.contains(name), "{what}");
                } else {
                    // Failed and undone: check_consistent found no VM or volume of it.
                    assert!(!db_names.contains(name), "a failed create leaves nothing: {what}");
                }
            }
            Change::DeleteDatabase(name) => {
                assert!([202, 404].contains(&o.status), "{what}");
                if o.succeeded() || o.status == 404 {
                    assert!(!db_names.contains(name), "a deleted database is gone: {what}");
                }
            }
        }
    }

    // Everything deleted leaves nothing behind: the databases and VMs, then what they
    // used. A database's VM goes with the database.
    let deadline = Instant::now() + Duration::from_secs(180);
    let db_vms: BTreeSet<String> = db_names.iter().map(|n| format!("db-{n}")).collect();
    all_succeed(
        &client,
        db_names.iter().cloned().map(Change::DeleteDatabase).chain(
            vm_names
                .iter()
                .filter(|n| !db_vms.contains(*n))
                .cloned()
                .map(Change::DeleteVm),
        ),
        deadline,
        "teardown",
    )
    .await;
    let networks = net_names
        .iter()
        .filter(|n| *n != "default")
        .cloned()
        .map(Change::DeleteNetwork);
    // A database's data volume went with it.
    let volumes = vol_names
        .iter()
        .filter(|v| !db_names.iter().any(|n| **v == format!("db-{n}-data")))
        .cloned()
        .map(Change::DeleteVolume);
    all_succeed(&client, networks.chain(volumes), deadline, "teardown").await;
    let left = check_consistent(&stack, per_network).await;
    assert!(left.is_empty(), "{left:?}");
    assert!(stack.vmm_processes().is_empty(), "{:?}", stack.vmm_processes());
    assert!(stack.vm_dirs().is_empty(), "{:?}", stack.vm_dirs());
    let ports: Vec<Value> = netd_client.get("/ports").await.expect("ports");
    assert!(ports.is_empty(), "{ports:?}");
    assert!(
        files(&stack.data_dir().join("imaged/seeds")).is_empty(),
        "no cloud-init seed left"
    );
    let log = stack.log();
    assert!(log.contains("reconciled"), "{log}");
}

/// Database `name` answers a query over verify-full TLS with `password`.
async fn assert_answers(stack: &Stack, name: &str, password: &str) {
    let (status, db) = stack.call("GET", &format!("/v1/databases/{name}"), None).await;
    assert_eq!(status, 200, "{db}");
    let (status, ca) = stack.call("GET", &format!("/v1/databases/{name}/ca.pem"), None).await;
    assert_eq!(status, 200, "{ca}");
    let dir = tempfile::tempdir().expect("tmp");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.as_str().unwrap_or_default()).expect("ca");
    let uri = format!("{}&sslrootcert={}", db["uri"].as_str().expect("uri"), ca_file.display());
    let out = tokio::process::Command::new("psql")
        .args(["-X", "-Atc", "SELECT 41 + 1", &uri])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .await
        .expect("psql");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "42",
        "database {name} answers with its password: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The periodic pass (`--reconcile-interval 1`) removes what the daemons hold for VMs
/// that do not exist, made behind the api's back while it serves, makes again a
/// network netd lost, and leaves alone
/// every VM, network and volume being created or deleted meanwhile: each of those
/// requests succeeds and every VM keeps its parts.
#[test]
fn periodic_pass_removes_orphans_and_leaves_work_in_flight_alone() {
    in_private_netns(|| async {
        let stack = Stack::start_separate(&["--reconcile-interval", "1"]).await;
        let client = stack.client();
        let deadline = Instant::now() + Duration::from_secs(120);
        let netd = daemon(&stack, "netd");
        let per_network = netd.get::<Value>("/networks/default").await.expect("default")["allocated"]
            .as_u64()
            .expect("allocated") as usize;
        let o = send(
            client.clone(),
            Change::CreateVm {
                name: "model".into(),
                start: false,
                volume: None,
            },
            deadline,
        )
        .await;
        assert!(o.succeeded(), "{o:?}");
        let model_id = o.body["vm"]["id"].as_str().expect("id").to_string();
        let o = send(
            client.clone(),
            Change::CreateNetwork {
                name: "lab".into(),
                subnet: "10.103.0.0/24".into(),
            },
            deadline,
        )
        .await;
        assert!(o.succeeded(), "{o:?}");

        // Creates and deletes, back to back, for a few passes' time.
        let busy_until = Instant::now() + Duration::from_secs(6);
        let socket_dir = stack.data_dir().join("run");
        let worker = |lane: usize| {
            let client = client.clone();
            let socket_dir = socket_dir.clone();
            async move {
                let mut done = 0;
                while Instant::now() < busy_until {
                    let (create, delete) = match lane {
                        0 | 1 => {
                            let name = format!("w{lane}-{done}");
                            (
                                Change::CreateVm {
                                    name: name.clone(),
                                    start: false,
                                    volume: None,
                                },
                                Change::DeleteVm(name),
                            )
                        }
                        2 => {
                            let name = format!("wn{done}");
                            (
                                Change::CreateNetwork {
                                    name: name.clone(),
                                    subnet: format!("10.102.{}.0/24", done % 250),
                                },
                                Change::DeleteNetwork(name),
                            )
                        }
                        _ => {
                            let name = format!("wv{done}");
                            (Change::CreateVolume(name.clone()), Change::DeleteVolume(name))
                        }
                    };
                    let o = send(client.clone(), create.clone(), deadline).await;
                    assert!(o.succeeded() && o.attempts == 1, "work in flight was disturbed: {o:?}");
                    // Whole a moment later, while passes run: nothing of it was taken.
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    let parts = match &create {
                        Change::CreateVm { .. } => {
                            let id = o.body["vm"]["id"].as_str().expect("id");
                            vec![
                                ("vmm-manager", format!("/vms/{id}")),
                                ("netd", format!("/ports/{id}-0")),
                            ]
                        }
                        Change::CreateNetwork { name, .. } => vec![("netd", format!("/networks/{name}"))],
                        Change::CreateVolume(name) => vec![("blockd", format!("/volumes/{name}"))],
                        _ => unreachable!(),
                    };
                    for (d, path) in parts {
                        let r = UnixClient::new(socket_dir.join(format!("{d}.sock")))
                            .raw(http::Method::GET, &path, None)
                            .await
                            .expect("daemon answers");
                        assert_eq!(r.status, 200, "{d} lost {path} of {create:?} while it existed");
                    }
                    let o = send(client.clone(), delete, deadline).await;
                    assert!(o.succeeded() && o.attempts == 1, "work in flight was disturbed: {o:?}");
                    done += 1;
                }
                done
            }
        };
        // Orphans: parts of VMs that do not exist, made through the daemons' sockets.
        let orphans = async {
            let (vmm, blockd) = (daemon(&stack, "vmm-manager"), daemon(&stack, "blockd"));
            let mut made = Vec::new();
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let ghost = uuid::Uuid::new_v4().to_string();
                let put = |c: &UnixClient, path: String, body: Value| {
                    let c = c.clone();
                    async move {
                        let r = c
                            .raw(http::Method::PUT, &path, Some(body.to_string().into_bytes()))
                            .await
                            .expect("daemon answers");
                        assert!(r.status.is_success(), "PUT {path}: {}", r.status);
                    }
                };
                put(&netd, format!("/ports/{ghost}-0"), json!({"network": "default"})).await;
                put(
                    &blockd,
                    format!("/volumes/vm-{ghost}-root"),
                    json!({"size_bytes": 1048576}),
                )
                .await;
                let mut spec: Value = serde_json::from_slice(
                    &std::fs::read(stack.data_dir().join(format!("run/vms/{model_id}/spec.json"))).expect("spec"),
                )
                .expect("json");
                spec["id"] = json!(ghost);
                spec["name"] = json!(format!("ghost-{ghost}"));
                spec["nics"] = json!([]);
                put(&vmm, format!("/vms/{ghost}"), spec).await;
                made.push(ghost);
            }
            // A network netd loses (its state, or removed by hand) is made again.
            let r = netd
                .raw(http::Method::DELETE, "/networks/lab", None)
                .await
                .expect("netd");
            assert!(r.status.is_success(), "{}", r.status);
            made
        };
        let (w0, w1, w2, w3, ghosts) = tokio::join!(worker(0), worker(1), worker(2), worker(3), orphans);
        eprintln!("while the passes ran: {w0} + {w1} VM, {w2} network and {w3} volume creates and deletes");

        // The next passes remove the last orphans.
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let vmm = daemon(&stack, "vmm-manager");
            let mut left = Vec::new();
            for g in &ghosts {
                for (c, path) in [
                    (&vmm, format!("/vms/{g}")),
                    (&netd, format!("/ports/{g}-0")),
                    (&daemon(&stack, "blockd"), format!("/volumes/vm-{g}-root")),
                ] {
                    let r = c.raw(http::Method::GET, &path, None).await.expect("daemon answers");
                    if r.status != 404 {
                        left.push(path);
                    }
                }
            }
            if netd
                .raw(http::Method::GET, "/networks/lab", None)
                .await
                .expect("netd")
                .status
                != 200
            {
                left.push("network lab not made again".into());
            }
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < until, "orphans still there: {left:?}\n{}", stack.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (status, metrics) = stack.call("GET", "/metrics", None).await;
        assert_eq!(status, 200);
        let text = metrics.as_str().unwrap_or_default().to_string();
        let counter = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("hearth_{name}_total ")))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} in {text}"))
        };
        assert!(counter("reconcile_periodic_passes") >= 5, "{text}");
        assert!(
            counter("reconcile_periodic_repairs") >= 9,
            "3 x (VMM, port, disk): {text}"
        );
        let vms = check_consistent(&stack, per_network).await;
        assert_eq!(names(&vms, "name"), BTreeSet::from(["model".to_string()]));
        assert!(stack.log().contains("reconciled drift"), "{}", stack.log());
    });
}
