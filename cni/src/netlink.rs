//! The netlink operations Velox needs, on an rtnetlink connection bound to one
//! network namespace.

use anyhow::Context;
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

pub type Mac = [u8; 6];

/// Marks the routes the loader owns (to other nodes' pod CIDRs), so it can find and
/// replace them without touching anyone else's.
pub const VELOX_ROUTE_PROTOCOL: u8 = 0x56; // 'V'

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub protocol: u8,
    message: RouteMessage,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Mac,
    pub mtu: u32,
}

/// Runs `f` with the calling thread in `netns`, then returns it to where it was.
/// Sockets created inside stay bound to `netns` after the thread has left it.
pub fn in_netns<T>(netns: &File, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    let original = File::open("/proc/thread-self/ns/net").context("opening own netns")?;
    setns(netns, CloneFlags::CLONE_NEWNET).context("entering the network namespace")?;
    let out = f();
    // Staying in the pod's namespace would make every later step act on the wrong host.
    setns(&original, CloneFlags::CLONE_NEWNET).expect("returning to the original network namespace");
    Ok(out)
}

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// A connection in the caller's network namespace. Needs a tokio runtime.
    pub fn connect() -> anyhow::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection().context("opening netlink")?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// A connection acting inside `netns`.
    pub fn connect_in(netns: &File) -> anyhow::Result<Self> {
        in_netns(netns, Self::connect)?
    }

    pub async fn link(&self, name: &str) -> anyhow::Result<Option<Link>> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(link_from(&msg))),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
        }
    }

    /// A veth pair: `host` here, `peer` created directly inside `peer_netns`.
    pub async fn create_veth(&self, host: &str, peer: &str, peer_netns: &File, mtu: u32) -> anyhow::Result<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .mtu(mtu)
            .setns_by_fd(peer_netns.as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host.to_string())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .with_context(|| format!("creating veth pair {host} <-> {peer}"))
    }

    pub async fn set_up(&self, index: u32) -> anyhow::Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("setting link {index} up"))
    }

    /// Deletes a link; one that is already gone is not an error.
    pub async fn delete_link(&self, name: &str) -> anyhow::Result<()> {
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(link.index).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => Ok(()),
            other => other.with_context(|| format!("deleting link {name}")),
        }
    }

    pub async fn add_address(&self, index: u32, address: Ipv4Net) -> anyhow::Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(address.addr()), address.prefix_len())
            .execute()
            .await
            .with_context(|| format!("adding address {address}"))
    }

    pub async fn addresses(&self, index: u32) -> anyhow::Result<Vec<Ipv4Net>> {
        let mut out = Vec::new();
        let mut stream = self.handle.address().get().set_link_index_filter(index).execute();
        while let Some(msg) = stream.try_next().await.context("listing addresses")? {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                    out.push(Ipv4Net::new(*ip, msg.header.prefix_len)?);
                }
            }
        }
        Ok(out)
    }

    /// `ip route add <dst> dev <index> scope link`
    pub async fn add_link_route(&self, index: u32, dst: Ipv4Net) -> anyhow::Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        self.handle
            .route()
            .add(msg)
            .execute()
            .await
            .with_context(|| format!("adding route {dst}"))
    }

    /// `ip route add default via <gateway> dev <index> onlink`
    pub async fn add_default_route_onlink(&self, index: u32, gateway: Ipv4Addr) -> anyhow::Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(index)
            .onlink()
            .build();
        self.handle
            .route()
            .add(msg)
            .execute()
            .await
            .with_context(|| format!("adding default route via {gateway}"))
    }

    /// `ip route replace <dst> via <gateway> dev <index> proto velox`
    pub async fn replace_route_via(&self, dst: Ipv4Net, gateway: Ipv4Addr, index: u32) -> anyhow::Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .gateway(gateway)
            .output_interface(index)
            .protocol(RouteProtocol::Other(VELOX_ROUTE_PROTOCOL))
            .build();
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .with_context(|| format!("routing {dst} via {gateway}"))
    }

    pub async fn delete_route(&self, route: &Route) -> anyhow::Result<()> {
        self.handle
            .route()
            .del(route.message.clone())
            .execute()
            .await
            .with_context(|| format!("deleting route {}", route.dst))
    }

    /// The IPv4 routes of the main table.
    pub async fn routes(&self) -> anyhow::Result<Vec<Route>> {
        let mut out = Vec::new();
        let mut stream = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(msg) = stream.try_next().await.context("listing routes")? {
            out.push(route_from(msg)?);
        }
        Ok(out)
    }

    /// `ip neigh add <ip> lladdr <mac> dev <index> nud permanent`
    pub async fn add_permanent_neighbour(&self, index: u32, ip: Ipv4Addr, mac: Mac) -> anyhow::Result<()> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .execute()
            .await
            .with_context(|| format!("adding neighbour {ip}"))
    }
}

fn libc_enodev() -> i32 {
    nix::errno::Errno::ENODEV as i32
}

fn link_from(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: [0; 6],
        mtu: 0,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Address(mac) if mac.len() == 6 => link.mac.copy_from_slice(mac),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            _ => {}
        }
    }
    link
}

fn route_from(message: RouteMessage) -> anyhow::Result<Route> {
    let (mut dst, mut gateway, mut oif) = (Ipv4Addr::UNSPECIFIED, None, None);
    for attr in &message.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Oif(index) => oif = Some(*index),
            _ => {}
        }
    }
    Ok(Route {
        dst: Ipv4Net::new(dst, message.header.destination_prefix_length)?,
        gateway,
        oif,
        protocol: message.header.protocol.into(),
        message,
    })
}

pub fn format_mac(mac: &Mac) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_print_like_iproute2() {
        let mac = [0x02, 0xab, 0, 0x10, 0xff, 0x01];
        assert_eq!(format_mac(&mac), "02:ab:00:10:ff:01");
    }
}
