//! netd's batch of ports (`PUT /ports`): all or nothing, against the real kernel, in a
//! private network namespace.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use common::in_private_netns;
use netd::network::{NetdConfig, NetworkService, NetworkSpec, PortSpec};

fn spec(network: &str, ip: Option<&str>) -> PortSpec {
    PortSpec {
        network: network.into(),
        mac: None,
        ip: ip.map(|a| a.parse().expect("address")),
        queues: 1,
        ingress: None,
    }
}

fn batch(ports: &[(&str, Option<&str>)]) -> Vec<(String, PortSpec)> {
    ports
        .iter()
        .map(|(id, ip)| (id.to_string(), spec("small", *ip)))
        .collect()
}

#[test]
fn a_batch_of_ports_is_made_whole_or_not_at_all() {
    in_private_netns(|| async {
        let state = tempfile::tempdir().expect("tempdir");
        let svc = NetworkService::open(NetdConfig::new(state.path())).await.expect("netd");
        // A /29: gateway .1, five addresses for VMs (.2 to .6).
        let network: NetworkSpec = serde_json::from_value(serde_json::json!({
            "name": "small", "subnet": "10.60.0.0/29"
        }))
        .expect("spec");
        svc.ensure_network(network).await.expect("network");

        let made = svc
            .ensure_ports(batch(&[("a", None), ("b", None), ("c", Some("10.60.0.6"))]))
            .await
            .expect("three ports");
        let ips: BTreeMap<String, Ipv4Addr> = made.iter().map(|p| (p.id.clone(), p.ip)).collect();
        assert_eq!(ips["a"].to_string(), "10.60.0.2");
        assert_eq!(ips["b"].to_string(), "10.60.0.3");
        assert_eq!(ips["c"].to_string(), "10.60.0.6");
        let counters = netd::firewall::counters().expect("counters");
        for port in &made {
            assert!(netd::tap::tap_exists(&port.tap), "TAP {} missing", port.tap);
            assert!(counters.contains_key(&netd::firewall::spoof_counter(&port.tap)));
        }

        // "e" asks for an address "c" holds: "d" and "e" must both be left unmade.
        let err = svc
            .ensure_ports(batch(&[("d", None), ("e", Some("10.60.0.6"))]))
            .await
            .expect_err("a taken address");
        assert!(err.to_string().contains("10.60.0.6"), "{err}");
        // Three more than the two free addresses: nothing is made either.
        let err = svc
            .ensure_ports(batch(&[("f", None), ("g", None), ("h", None)]))
            .await
            .expect_err("more ports than addresses");
        assert!(err.to_string().contains("no free address"), "{err}");
        for id in ["d", "e", "f", "g", "h"] {
            let tap = netd::tap::tap_name_for(id, 0);
            assert!(!netd::tap::tap_exists(&tap), "TAP {tap} of {id} left behind");
            assert!(svc.port(id).await.is_err(), "port {id} left behind");
            assert!(!state.path().join("ports").join(format!("{id}.json")).exists());
        }
        let counters = netd::firewall::counters().expect("counters");
        let spoof: Vec<_> = counters.keys().filter(|k| k.starts_with("spoof_")).collect();
        assert_eq!(spoof.len(), 3, "only the three ports may send: {spoof:?}");
        assert_eq!(svc.network("small").await.expect("network").allocated, 3);

        // Asking again for what exists is fine; the two free addresses are still free.
        svc.ensure_ports(batch(&[("a", None), ("d", None), ("e", None)]))
            .await
            .expect("the same ports and two new ones");
        assert_eq!(svc.network("small").await.expect("network").allocated, 5);

        // Everything survives a restart of the service.
        drop(svc);
        let svc = NetworkService::open(NetdConfig::new(state.path()))
            .await
            .expect("netd again");
        let ports = svc.ports().await;
        assert_eq!(ports.len(), 5);
        assert_eq!(svc.port("c").await.expect("c").ip.to_string(), "10.60.0.6");
        for id in ["a", "b", "c", "d", "e"] {
            svc.delete_port(id).await.expect("delete");
        }
        svc.delete_network("small").await.expect("delete network");
    });
}
