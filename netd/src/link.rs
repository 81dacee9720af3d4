//! Links and addresses through netlink (rtnetlink): bridges, their addresses and ports,
//! VXLAN devices and their peers (unicast FDB entries). Never `ip`.
//!
//! A netlink socket lives in the network namespace of the thread that opened it, so a
//! [`Netlink`] serves the namespace netd was started in.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVxlan};

/// A netlink failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("netlink: cannot {action}: {source}")]
pub struct LinkError {
    pub action: String,
    #[source]
    pub source: rtnetlink::Error,
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// What [`Netlink::configure`] changes on a link; `None`/`false` leaves it as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkChange {
    pub mac: Option<[u8; 6]>,
    pub controller: Option<u32>,
    pub up: bool,
}

/// A link as netlink reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub controller: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
}

fn info(msg: &LinkMessage) -> LinkInfo {
    let mut out = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        controller: None,
        mac: None,
        up: msg.header.flags.contains(rtnetlink::packet_route::link::LinkFlags::Up),
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => out.name = n.clone(),
            LinkAttribute::Controller(c) => out.controller = Some(*c),
            LinkAttribute::Address(m) if m.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(m);
                out.mac = Some(mac);
            }
            _ => {}
        }
    }
    out
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        mac[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// A netlink connection.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket in the current thread's network namespace; must be called
    /// inside a tokio runtime.
    pub fn connect() -> std::io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    fn err(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
        let action = action.into();
        move |source| LinkError { action, source }
    }

    /// Looks a link up by name.
    pub async fn link(&self, name: &str) -> Result<Option<LinkInfo>, LinkError> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(info(&msg))),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(Self::err(format!("look up {name}"))(e)),
        }
    }

    /// Every link in the namespace.
    pub async fn links(&self) -> Result<Vec<LinkInfo>, LinkError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(Self::err("list links"))?;
        Ok(msgs.iter().map(info).collect())
    }

    async fn require(&self, name: &str) -> Result<LinkInfo, LinkError> {
        self.link(name).await?.ok_or_else(|| LinkError {
            action: format!("find {name}"),
            source: rtnetlink::Error::RequestFailed,
        })
    }

    /// Creates the bridge if missing and brings it up. Returns its index.
    pub async fn ensure_bridge(&self, name: &str) -> Result<u32, LinkError> {
        if self.link(name).await?.is_none() {
            match self.handle.link().add(LinkBridge::new(name).build()).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(Self::err(format!("create bridge {name}"))(e)),
            }
        }
        let link = self.require(name).await?;
        self.set_up(link.index).await?;
        Ok(link.index)
    }

    /// Creates a VXLAN device (point-to-multipoint, no learning: peers come from FDB
    /// entries) if missing and brings it up.
    pub async fn ensure_vxlan(
        &self,
        name: &str,
        vni: u32,
        local: Ipv4Addr,
        underlay: Option<u32>,
        port: u16,
    ) -> Result<u32, LinkError> {
        if self.link(name).await?.is_none() {
            let mut b = LinkVxlan::new(name, vni).local(local).port(port).learning(false);
            if let Some(dev) = underlay {
                b = b.dev(dev);
            }
            match self.handle.link().add(b.build()).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(Self::err(format!("create VXLAN {name} (VNI {vni})"))(e)),
            }
        }
        let link = self.require(name).await?;
        self.set_up(link.index).await?;
        Ok(link.index)
    }

    pub async fn set_up(&self, index: u32) -> Result<(), LinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(Self::err(format!("bring link {index} up")))
    }

    /// Changes a link's MAC, bridge and state in one request.
    pub async fn configure(&self, index: u32, change: LinkChange) -> Result<(), LinkError> {
        let mut link = LinkUnspec::new_with_index(index);
        if let Some(mac) = change.mac {
            link = link.address(mac.to_vec());
        }
        if let Some(bridge) = change.controller {
            link = link.controller(bridge);
        }
        if change.up {
            link = link.up();
        }
        self.handle
            .link()
            .set(link.build())
            .execute()
            .await
            .map_err(Self::err(format!("configure link {index}")))
    }

    /// Deletes a link by name; a missing link is success.
    pub async fn delete(&self, name: &str) -> Result<(), LinkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(Self::err(format!("delete {name}"))(e)),
        }
    }

    /// IPv4 addresses on a link.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, LinkError> {
        use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(Self::err(format!("list addresses of link {index}")))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(v4)) => Some((*v4, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    /// Adds an address unless the link already has it.
    pub async fn ensure_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<(), LinkError> {
        if self.addresses(index).await?.contains(&(addr, prefix)) {
            return Ok(());
        }
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(Self::err(format!("add {addr}/{prefix} to link {index}"))(e)),
        }
    }

    /// Adds a VXLAN peer: an all-zero-MAC FDB entry pointing at `peer` (what `bridge fdb
    /// append 00:00:00:00:00:00 dev VXLAN dst PEER` does). Adding it twice is harmless.
    pub async fn fdb_append_peer(&self, vxlan: u32, peer: Ipv4Addr) -> Result<(), LinkError> {
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(peer_entry(vxlan, peer)));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
        self.peer_request(req, format!("add VXLAN peer {peer}"), libc::EEXIST)
            .await
    }

    /// Sends a peer's FDB request; `harmless` is the errno that means it is done already.
    async fn peer_request(
        &self,
        req: NetlinkMessage<RouteNetlinkMessage>,
        what: String,
        harmless: i32,
    ) -> Result<(), LinkError> {
        let mut handle = self.handle.clone();
        let mut resp = handle.request(req).map_err(Self::err(what.clone()))?;
        use futures_util::StreamExt;
        while let Some(m) = resp.next().await {
            if let NetlinkPayload::Error(e) = m.payload {
                let err = rtnetlink::Error::NetlinkError(e);
                if errno(&err) == Some(harmless) {
                    return Ok(());
                }
                return Err(Self::err(what)(err));
            }
        }
        Ok(())
    }
}

impl Netlink {
    /// Removes a VXLAN peer's all-zero-MAC FDB entry (what `bridge fdb del
    /// 00:00:00:00:00:00 dev VXLAN dst PEER` does): its traffic is no longer sent or
    /// flooded there. Removing a missing one is harmless.
    pub async fn fdb_delete_peer(&self, vxlan: u32, peer: Ipv4Addr) -> Result<(), LinkError> {
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::DelNeighbour(peer_entry(vxlan, peer)));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        self.peer_request(req, format!("remove VXLAN peer {peer}"), libc::ENOENT)
            .await
    }
}

/// A VXLAN device's all-zero-MAC FDB entry for `peer`.
fn peer_entry(vxlan: u32, peer: Ipv4Addr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = vxlan;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(vec![0; 6]));
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(peer)));
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread inside a fresh network namespace with its own runtime.
    fn in_netns<F: std::future::Future<Output = ()>>(f: impl FnOnce() -> F + Send + 'static) {
        let t = std::thread::spawn(move || {
            // SAFETY: unshare only changes this thread's network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare (needs root)");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(f());
        });
        if let Err(p) = t.join() {
            std::panic::resume_unwind(p);
        }
    }

    fn ip(args: &[&str]) -> String {
        let out = std::process::Command::new("ip").args(args).output().expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn bridges_addresses_vxlan_and_peers() {
        in_netns(|| async {
            let nl = Netlink::connect().expect("netlink");
            let lo = nl.link("lo").await.expect("lookup").expect("lo exists");
            nl.set_up(lo.index).await.expect("lo up");
            assert_eq!(nl.link("hbr-none").await.expect("lookup"), None);

            let br = nl.ensure_bridge("hbr-test").await.expect("bridge");
            assert_eq!(nl.ensure_bridge("hbr-test").await.expect("again"), br, "idempotent");
            nl.ensure_address(br, "10.9.0.1".parse().expect("ip"), 24)
                .await
                .expect("addr");
            nl.ensure_address(br, "10.9.0.1".parse().expect("ip"), 24)
                .await
                .expect("addr again");
            assert_eq!(
                nl.addresses(br).await.expect("list"),
                vec![("10.9.0.1".parse().expect("ip"), 24)]
            );
            let shown = ip(&["-br", "addr", "show", "hbr-test"]);
            assert!(shown.contains("10.9.0.1/24"), "{shown}");

            let vx = nl
                .ensure_vxlan("hvx-test", 4242, "127.0.0.1".parse().expect("ip"), Some(lo.index), 4789)
                .await
                .expect("vxlan");
            let change = LinkChange {
                mac: Some([0x52, 0x54, 0, 1, 2, 3]),
                controller: Some(br),
                up: false,
            };
            nl.configure(vx, change).await.expect("attach and set the MAC");
            for peer in ["192.0.2.10", "192.0.2.11", "192.0.2.10"] {
                nl.fdb_append_peer(vx, peer.parse().expect("ip")).await.expect("peer");
            }
            let fdb = ip(&["link", "show", "hvx-test"])
                + &String::from_utf8_lossy(
                    &std::process::Command::new("bridge")
                        .args(["fdb", "show", "dev", "hvx-test"])
                        .output()
                        .expect("bridge")
                        .stdout,
                );
            assert!(fdb.contains("master hbr-test"), "{fdb}");
            assert!(fdb.contains("52:54:00:01:02:03"), "{fdb}");
            assert_eq!(fdb.matches("00:00:00:00:00:00 dst 192.0.2.10").count(), 1, "{fdb}");
            assert!(fdb.contains("00:00:00:00:00:00 dst 192.0.2.11"), "{fdb}");
            // A peer that leaves is taken out (twice is harmless); the other stays.
            for _ in 0..2 {
                nl.fdb_delete_peer(vx, "192.0.2.10".parse().expect("ip"))
                    .await
                    .expect("remove peer");
            }
            let fdb = String::from_utf8_lossy(
                &std::process::Command::new("bridge")
                    .args(["fdb", "show", "dev", "hvx-test"])
                    .output()
                    .expect("bridge")
                    .stdout,
            )
            .into_owned();
            assert!(!fdb.contains("dst 192.0.2.10"), "{fdb}");
            assert!(fdb.contains("00:00:00:00:00:00 dst 192.0.2.11"), "{fdb}");
            let details = ip(&["-d", "link", "show", "hvx-test"]);
            assert!(details.contains("vxlan id 4242"), "{details}");

            nl.delete("hvx-test").await.expect("delete");
            nl.delete("hvx-test").await.expect("delete missing");
            nl.delete("hbr-test").await.expect("delete");
            assert!(nl.link("hbr-test").await.expect("lookup").is_none());
            assert_eq!(parse_mac("52:54:00:aa:bb:cc"), Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]));
            assert_eq!(parse_mac("52:54:00:aa:bb"), None);
        });
    }
}
