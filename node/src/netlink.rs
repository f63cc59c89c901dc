//! The netlink operations Velox needs, on an rtnetlink connection bound to one
//! network namespace, for both address families.

use futures::{Stream, StreamExt, TryStreamExt};
use ipnet::IpNet;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::address::{AddressAttribute, AddressHeaderFlags};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{
    Handle, IpVersion, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, MulticastGroup, RouteMessageBuilder,
};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use crate::error::{Error, Result};
use crate::Family;

pub type Mac = [u8; 6];

/// Marks the routes the loader owns (to other nodes' pod CIDRs), so it can find and
/// replace them without touching anyone else's.
pub const VELOX_ROUTE_PROTOCOL: u8 = 0x56; // 'V'

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub protocol: u8,
    /// The routing table it is in (`MAIN_TABLE`, or Velox's `VELOX_ROUTE_TABLE` ..).
    pub table: u32,
    message: RouteMessage,
}

/// The kernel's main routing table.
pub const MAIN_TABLE: u32 = 254;
/// Velox's own table, for the routes only pods' packets take (by a rule on their
/// source): to a tunnelled node's addresses through the tunnel. 'VE'.
pub const VELOX_ROUTE_TABLE: u32 = 0x5645;

/// A routing policy rule `from <source> lookup <table>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub source: Option<IpNet>,
    pub table: u32,
    message: RuleMessage,
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
pub fn in_netns<T>(netns: &File, f: impl FnOnce() -> T) -> Result<T> {
    let original = File::open("/proc/thread-self/ns/net").map_err(Error::io("opening own netns"))?;
    setns(netns, CloneFlags::CLONE_NEWNET).map_err(|e| Error::io("entering the network namespace")(e.into()))?;
    let out = f();
    // Staying in the pod's namespace would make every later step act on the wrong host.
    setns(&original, CloneFlags::CLONE_NEWNET).expect("returning to the original network namespace");
    Ok(out)
}

/// The kernel's cookie of the network namespace `netns`: what
/// `bpf_get_netns_cookie` returns for its sockets.
pub fn netns_cookie(netns: &File) -> Result<u64> {
    const SO_NETNS_COOKIE: i32 = 71;
    in_netns(netns, || -> Result<u64> {
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
        use std::os::fd::AsRawFd;
        let probe = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| Error::io("opening a socket in the pod")(e.into()))?;
        let (mut cookie, mut len) = (0u64, std::mem::size_of::<u64>() as nix::libc::socklen_t);
        // SAFETY: `cookie` and `len` are valid for the kernel to write.
        let done = unsafe {
            nix::libc::getsockopt(
                probe.as_raw_fd(),
                nix::libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        if done != 0 {
            return Err(Error::io("reading the network namespace cookie")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(cookie)
    })?
}

fn is_enodev(error: &rtnetlink::Error) -> bool {
    is_errno(error, nix::errno::Errno::ENODEV)
}

fn is_errno(error: &rtnetlink::Error, errno: nix::errno::Errno) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(e) if e.raw_code() == -(errno as i32))
}

pub struct Netlink {
    handle: Handle,
}

/// What [`link_deletions`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// The interface with this index is gone.
    Deleted(u32),
    /// The socket overflowed: deletions went unreported, look for yourself.
    Lost,
}

/// Interfaces deleted in the caller's network namespace, as the kernel announces
/// them (`RTM_DELLINK`). Needs a tokio runtime.
pub fn link_deletions() -> Result<impl Stream<Item = LinkEvent> + Unpin> {
    let (connection, _, messages) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
        .map_err(Error::io("subscribing to link events"))?;
    tokio::spawn(connection);
    Ok(messages.filter_map(|(message, _)| {
        futures::future::ready(match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                Some(LinkEvent::Deleted(link.header.index))
            }
            NetlinkPayload::Overrun(_) => Some(LinkEvent::Lost),
            _ => None,
        })
    }))
}

impl Netlink {
    /// A connection in the caller's network namespace. Needs a tokio runtime.
    pub fn connect() -> Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(Error::io("opening netlink"))?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// A connection acting inside `netns`.
    pub fn connect_in(netns: &File) -> Result<Self> {
        in_netns(netns, Self::connect)?
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        Ok(self.link_message(name).await?.as_ref().map(link_from))
    }

    async fn link_message(&self, name: &str) -> Result<Option<LinkMessage>> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(found) => Ok(found),
            Err(e) if is_enodev(&e) => Ok(None),
            Err(e) => Err(Error::netlink(format!("looking up link {name}"))(e)),
        }
    }

    /// The interface that holds `ip`, if any.
    pub async fn link_with_address(&self, ip: IpAddr) -> Result<Option<Link>> {
        let mut stream = self.handle.address().get().execute();
        let mut index = None;
        while let Some(msg) = stream.try_next().await.map_err(Error::netlink("listing addresses"))? {
            if msg.attributes.contains(&AddressAttribute::Address(ip)) {
                index = Some(msg.header.index);
            }
        }
        let Some(index) = index else {
            return Ok(None);
        };
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(found) => Ok(found.as_ref().map(link_from)),
            Err(e) if is_enodev(&e) => Ok(None),
            Err(e) => Err(Error::netlink(format!("looking up link {index}"))(e)),
        }
    }

    /// A veth pair: `host` here, `peer` created directly inside `peer_netns`.
    pub async fn create_veth(&self, host: &str, peer: &str, peer_netns: &File, mtu: u32) -> Result<()> {
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
            .map_err(Error::netlink(format!("creating veth pair {host} <-> {peer}")))
    }

    /// A collect-metadata (`external`) VXLAN device on UDP `port`: one device for
    /// every remote, the remote set per packet (`bpf_skb_set_tunnel_key`). No ARP and
    /// no multicast on it: its neighbours need no resolving, and nothing but
    /// Velox's traffic should go in. Left down.
    pub async fn create_vxlan(&self, name: &str, port: u16, mtu: u32) -> Result<()> {
        let msg = LinkMessageBuilder::<LinkVxlan>::new(name)
            .collect_metadata(true)
            .port(port)
            .learning(false)
            .mtu(mtu)
            .arp(false)
            .multicast(false)
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(Error::netlink(format!("creating VXLAN device {name}")))
    }

    /// The UDP port of VXLAN device `name`; `None` when there is no such device or
    /// it is not a collect-metadata VXLAN device.
    pub async fn vxlan_port(&self, name: &str) -> Result<Option<u16>> {
        let Some(msg) = self.link_message(name).await? else {
            return Ok(None);
        };
        let vxlan = msg.attributes.iter().find_map(|attr| match attr {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
                LinkInfo::Data(InfoData::Vxlan(vxlan)) => Some(vxlan),
                _ => None,
            }),
            _ => None,
        });
        let Some(vxlan) = vxlan.filter(|v| v.contains(&InfoVxlan::CollectMetadata(true))) else {
            return Ok(None);
        };
        Ok(vxlan.iter().find_map(|v| match v {
            InfoVxlan::Port(port) => Some(*port),
            _ => None,
        }))
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(Error::netlink(format!("setting the MTU of link {index} to {mtu}")))
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(Error::netlink(format!("setting link {index} up")))
    }

    /// Deletes a link; one that is already gone is not an error.
    pub async fn delete_link(&self, name: &str) -> Result<()> {
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(link.index).execute().await {
            Err(e) if is_enodev(&e) => Ok(()),
            other => other.map_err(Error::netlink(format!("deleting link {name}"))),
        }
    }

    /// `ip addr add <address> dev <index> nodad`: a pod's address is Velox's to give,
    /// so IPv6 duplicate address detection would only hold it tentative for a second.
    pub async fn add_address(&self, index: u32, address: IpNet) -> Result<()> {
        let mut request = self.handle.address().add(index, address.addr(), address.prefix_len());
        if address.addr().is_ipv6() {
            request.message_mut().header.flags = AddressHeaderFlags::Nodad;
        }
        request
            .execute()
            .await
            .map_err(Error::netlink(format!("adding address {address}")))
    }

    /// The addresses of both families on an interface.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        self.list_addresses(Some(index)).await
    }

    /// The addresses of both families on every interface of the namespace.
    pub async fn all_addresses(&self) -> Result<Vec<IpNet>> {
        self.list_addresses(None).await
    }

    async fn list_addresses(&self, index: Option<u32>) -> Result<Vec<IpNet>> {
        let mut out = Vec::new();
        let mut request = self.handle.address().get();
        if let Some(index) = index {
            request = request.set_link_index_filter(index);
        }
        let mut stream = request.execute();
        while let Some(msg) = stream.try_next().await.map_err(Error::netlink("listing addresses"))? {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    let net =
                        IpNet::new(*ip, msg.header.prefix_len).map_err(Error::invalid(format!("address {ip}")))?;
                    out.push(net);
                }
            }
        }
        Ok(out)
    }

    /// `ip route add <dst> dev <index> scope link`
    pub async fn add_link_route(&self, index: u32, dst: IpNet) -> Result<()> {
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(Error::invalid(format!("route {dst}")))?
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        self.handle
            .route()
            .add(msg)
            .execute()
            .await
            .map_err(Error::netlink(format!("adding route {dst}")))
    }

    /// `ip route add default via <gateway> dev <index> onlink`, in the gateway's family.
    pub async fn add_default_route_onlink(&self, index: u32, gateway: IpAddr) -> Result<()> {
        // The generic builder only learns the family from a destination.
        let msg = match gateway {
            IpAddr::V4(gw) => RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gw)
                .output_interface(index)
                .onlink()
                .build(),
            IpAddr::V6(gw) => RouteMessageBuilder::<Ipv6Addr>::new()
                .gateway(gw)
                .output_interface(index)
                .onlink()
                .build(),
        };
        self.handle
            .route()
            .add(msg)
            .execute()
            .await
            .map_err(Error::netlink(format!("adding default route via {gateway}")))
    }

    /// `ip route add <dst> via <gateway> dev <index> proto velox`: never replaces a
    /// route someone else made.
    pub async fn add_route_via(&self, dst: IpNet, gateway: IpAddr, index: u32) -> Result<()> {
        let what = format!("route {dst} via {gateway}");
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(Error::invalid(&what))?
            .gateway(gateway)
            .map_err(Error::invalid(&what))?
            .output_interface(index)
            .protocol(RouteProtocol::Other(VELOX_ROUTE_PROTOCOL))
            .build();
        self.handle
            .route()
            .add(msg)
            .execute()
            .await
            .map_err(Error::netlink(format!("routing {dst} via {gateway}")))
    }

    /// `ip route add <dst> dev <index> proto velox [src <source>] table <table>`: no
    /// gateway, for a device without neighbours to resolve (the VXLAN device).
    pub async fn add_route_through(&self, dst: IpNet, index: u32, source: Option<IpAddr>, table: u32) -> Result<()> {
        let what = format!("route {dst} through link {index} in table {table}");
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(Error::invalid(&what))?
            .output_interface(index)
            .table_id(table)
            .protocol(RouteProtocol::Other(VELOX_ROUTE_PROTOCOL));
        if let Some(source) = source {
            builder = builder.pref_source(source).map_err(Error::invalid(&what))?;
        }
        self.handle
            .route()
            .add(builder.build())
            .execute()
            .await
            .map_err(Error::netlink(what))
    }

    /// Deletes a route; one already gone (with its device, say) is not an error.
    pub async fn delete_route(&self, route: &Route) -> Result<()> {
        match self.handle.route().del(route.message.clone()).execute().await {
            Err(e) if is_errno(&e, nix::errno::Errno::ESRCH) => Ok(()),
            other => other.map_err(Error::netlink(format!("deleting route {}", route.dst))),
        }
    }

    /// The rules of one family that look up `table`.
    pub async fn rules(&self, family: Family, table: u32) -> Result<Vec<Rule>> {
        let version = match family {
            Family::V4 => IpVersion::V4,
            Family::V6 => IpVersion::V6,
        };
        let mut out = Vec::new();
        let mut stream = self.handle.rule().get(version).execute();
        while let Some(message) = stream.try_next().await.map_err(Error::netlink("listing rules"))? {
            let rule_table = message
                .attributes
                .iter()
                .find_map(|attr| match attr {
                    RuleAttribute::Table(table) => Some(*table),
                    _ => None,
                })
                .unwrap_or(u32::from(message.header.table));
            if rule_table != table {
                continue;
            }
            let source = message.attributes.iter().find_map(|attr| match attr {
                RuleAttribute::Source(ip) => IpNet::new(*ip, message.header.src_len).ok(),
                _ => None,
            });
            out.push(Rule { source, table, message });
        }
        Ok(out)
    }

    /// `ip rule add from <source> lookup <table> priority <priority>`
    pub async fn add_rule_from(&self, source: IpNet, table: u32, priority: u32) -> Result<()> {
        let request = self
            .handle
            .rule()
            .add()
            .table_id(table)
            .priority(priority)
            .action(RuleAction::ToTable);
        let result = match source {
            IpNet::V4(net) => request.v4().source_prefix(net.addr(), net.prefix_len()).execute().await,
            IpNet::V6(net) => request.v6().source_prefix(net.addr(), net.prefix_len()).execute().await,
        };
        result.map_err(Error::netlink(format!("adding rule from {source} lookup {table}")))
    }

    pub async fn delete_rule(&self, rule: &Rule) -> Result<()> {
        self.handle
            .rule()
            .del(rule.message.clone())
            .execute()
            .await
            .map_err(Error::netlink(format!(
                "deleting rule from {:?} lookup {}",
                rule.source, rule.table
            )))
    }

    /// The routes of one family, in every table.
    pub async fn routes(&self, family: Family) -> Result<Vec<Route>> {
        let filter = match family {
            Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let mut out = Vec::new();
        let mut stream = self.handle.route().get(filter).execute();
        while let Some(msg) = stream.try_next().await.map_err(Error::netlink("listing routes"))? {
            out.push(route_from(msg, family)?);
        }
        Ok(out)
    }

    /// `ip neigh add <ip> lladdr <mac> dev <index> nud permanent`
    pub async fn add_permanent_neighbour(&self, index: u32, ip: IpAddr, mac: Mac) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .execute()
            .await
            .map_err(Error::netlink(format!("adding neighbour {ip}")))
    }
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

fn route_address(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

fn route_from(message: RouteMessage, family: Family) -> Result<Route> {
    let mut dst = match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let (mut gateway, mut oif) = (None, None);
    let mut table = u32::from(message.header.table);
    for attr in &message.attributes {
        match attr {
            RouteAttribute::Destination(address) => dst = route_address(address).unwrap_or(dst),
            RouteAttribute::Gateway(address) => gateway = route_address(address),
            RouteAttribute::Oif(index) => oif = Some(*index),
            RouteAttribute::Table(id) => table = *id,
            _ => {}
        }
    }
    let prefix = message.header.destination_prefix_length;
    Ok(Route {
        dst: IpNet::new(dst, prefix).map_err(Error::invalid(format!("route {dst}/{prefix}")))?,
        gateway,
        oif,
        protocol: message.header.protocol.into(),
        table,
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
