//! Ingress allow-lists: TCP to chosen ports of a VM only from chosen networks (a managed
//! database's `allowed_cidrs`), kept in a table of its own, `bridge hearth_ingress`.
//!
//! Frames a bridge hands to a port pass its `forward` hook (from another port: a VM, a
//! VXLAN device) or its `output` hook (from the host itself, routed traffic included).
//! Both jump to `admit` when the frame is TCP to a guarded port of the TAP it leaves by;
//! `admit` lets it through only from an allowed network and otherwise drops it, counted
//! per TAP in the dynamic set `refused` (read as [`refused_counter`]). Every other frame
//! is left alone. A TAP's elements change in one transaction, so a port is never
//! unguarded between two lists.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::firewall::{CounterValue, FirewallError};
use crate::nft;

/// What may reach a port: TCP to `tcp_ports` only from `from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortIngress {
    pub tcp_ports: Vec<u16>,
    pub from: Vec<Ipv4Net>,
}

const TABLE: &str = r#"table bridge hearth_ingress {
    set guarded { type ifname . inet_service; }
    set allowed { type ifname . ipv4_addr; flags interval; }
    set refused { type ifname; size 65535; flags dynamic; counter; }
    chain forward {
        type filter hook forward priority -200; policy accept;
        oifname . tcp dport @guarded jump admit
    }
    chain output {
        type filter hook output priority -200; policy accept;
        oifname . tcp dport @guarded jump admit
    }
    chain admit {
        oifname . ip saddr @allowed accept
        update @refused { oifname } drop
    }
}
"#;

/// The name under which netd's counters report what `tap`'s allow-list dropped.
pub fn refused_counter(tap: &str) -> String {
    format!("ingress_drop_{tap}")
}

fn check(tap: &str, ingress: &PortIngress) -> Result<(), FirewallError> {
    if tap.is_empty() || tap.len() > 15 || !tap.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(FirewallError::InvalidSpec(format!(
            "TAP {tap:?} is not a name netd makes"
        )));
    }
    if ingress.tcp_ports.is_empty() || ingress.tcp_ports.contains(&0) {
        return Err(FirewallError::InvalidSpec(format!(
            "TAP {tap:?}: an allow-list guards 1 or more TCP ports (1-65535)"
        )));
    }
    Ok(())
}

fn elements(verb: &str, tap: &str, ingress: &PortIngress) -> String {
    let guarded: Vec<String> = ingress.tcp_ports.iter().map(|p| format!("\"{tap}\" . {p}")).collect();
    let mut s = format!(
        "{verb} element bridge hearth_ingress guarded {{ {} }}\n",
        guarded.join(", ")
    );
    if !ingress.from.is_empty() {
        // Overlapping intervals in one set are refused (EEXIST): merged first.
        let from = Ipv4Net::aggregate(&ingress.from.iter().map(|n| n.trunc()).collect::<Vec<_>>());
        let allowed: Vec<String> = from.iter().map(|n| format!("\"{tap}\" . {n}")).collect();
        s.push_str(&format!(
            "{verb} element bridge hearth_ingress allowed {{ {} }}\n",
            allowed.join(", ")
        ));
    }
    s
}

/// Whether the table exists.
pub fn present() -> bool {
    nft::run("list the ingress table", "list table bridge hearth_ingress").is_ok()
}

/// Makes the table anew holding exactly `ports` (TAP, allow-list), in one transaction.
pub fn rebuild(ports: &[(String, PortIngress)]) -> Result<(), FirewallError> {
    let mut commands = String::from("add table bridge hearth_ingress\ndelete table bridge hearth_ingress\n");
    commands.push_str(TABLE);
    for (tap, ingress) in ports {
        check(tap, ingress)?;
        commands.push_str(&elements("add", tap, ingress));
    }
    nft::run("load the ingress table", &commands)?;
    Ok(())
}

/// Replaces `tap`'s allow-list (`old`, what it had) by `new` (`None`: unguarded), in one
/// transaction; its drop count stays.
pub fn set(tap: &str, old: Option<&PortIngress>, new: Option<&PortIngress>) -> Result<(), FirewallError> {
    let mut commands = String::new();
    if let Some(old) = old {
        check(tap, old)?;
        // Adding first makes the deletes succeed when elements are missing.
        commands.push_str(&elements("add", tap, old));
        commands.push_str(&elements("delete", tap, old));
    }
    if let Some(new) = new {
        check(tap, new)?;
        commands.push_str(&elements("add", tap, new));
    } else {
        commands.push_str(&format!(
            "add element bridge hearth_ingress refused {{ \"{tap}\" }}\ndelete element bridge hearth_ingress refused {{ \"{tap}\" }}\n"
        ));
    }
    if commands.is_empty() {
        return Ok(());
    }
    nft::run(&format!("set the allow-list of {tap}"), &commands)?;
    Ok(())
}

/// What each TAP's allow-list dropped, by [`refused_counter`] name.
pub fn counters() -> BTreeMap<String, CounterValue> {
    let mut out = BTreeMap::new();
    let Ok(listing) = nft::run("list the ingress drops", "list set bridge hearth_ingress refused") else {
        return out;
    };
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(&listing) else {
        return out;
    };
    for set in doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("set"))
    {
        for e in set["elem"].as_array().into_iter().flatten() {
            let (Some(tap), Some(counter)) = (e["elem"]["val"].as_str(), e["elem"].get("counter")) else {
                continue;
            };
            if let Ok(c) = CounterValue::deserialize(counter) {
                out.insert(refused_counter(tap), c);
            }
        }
    }
    out
}

/// Removes the table (netd's [`crate::firewall::remove`] does).
pub fn remove() -> Result<(), FirewallError> {
    nft::run(
        "delete the ingress table",
        "add table bridge hearth_ingress\ndelete table bridge hearth_ingress\n",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_name_the_tap_its_ports_and_networks() {
        let i = PortIngress {
            tcp_ports: vec![5432],
            from: vec![
                "10.0.0.5/8".parse().expect("net"),
                "192.168.1.7/32".parse().expect("net"),
                "10.1.2.3/32".parse().expect("net"),
            ],
        };
        assert_eq!(
            elements("add", "htap1", &i),
            "add element bridge hearth_ingress guarded { \"htap1\" . 5432 }\n\
             add element bridge hearth_ingress allowed { \"htap1\" . 10.0.0.0/8, \"htap1\" . 192.168.1.7/32 }\n"
        );
        assert!(check("htap1", &i).is_ok());
        assert!(check("bad name", &i).is_err());
        assert!(check(
            "htap1",
            &PortIngress {
                tcp_ports: vec![],
                from: vec![]
            }
        )
        .is_err());
    }
}
