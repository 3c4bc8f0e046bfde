//! The cluster's network, laid out so that every fault is one switch.
//!
//! ```text
//!             host (the control plane: kube-apiserver on bridge tsc<s>-cp)
//!              │ tsc<s>-a-cp ↔ uplink             │ tsc<s>-b-cp ↔ uplink
//!        ┌─────┴──────┐      inter-site      ┌────┴───────┐
//!        │ router A   ├──────── isl ─────────┤ router B   │   (netns tsc<s>-ra / -rb)
//!        │ switch sw  │                      │ switch sw  │
//!        └─┬───────┬──┘                      └──┬───────┬─┘
//!        p-a1     p-a2                         p-b1    p-b2   (a node's own link)
//!        node-a1  node-a2                      node-b1 node-b2 (netns tsc<s>-a1 …)
//! ```
//!
//! Routing is static and never transits: router A knows the control plane
//! only through its own uplink and site B only through the inter-site link,
//! and the host does not forward (it only terminates traffic to the API).
//! So cutting a link really separates what it joins.
//!
//! A cut is a black hole, as a failed WAN link or a pulled cable seen from
//! far away: an nftables `netdev` table in the router's namespace drops
//! everything entering and leaving that one interface. Routes stay as they
//! are, so restoring is deleting the table; nothing else has to be rebuilt.

use crate::{
    HarnessError,
    cluster::{
        cmd::{run, run_in, run_in_with_stdin},
        layout::{NodeId, Site, Slot, cidr},
    },
};

/// One switch of the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Link {
    /// Between the two sites' routers.
    InterSite,
    /// Between a site's router and the control plane.
    Uplink(Site),
    /// A node's own link to its site's switch.
    Node(NodeId),
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Link::InterSite => f.write_str("site-a <-> site-b"),
            Link::Uplink(site) => write!(f, "{site} <-> control plane"),
            Link::Node(node) => write!(f, "{node} <-> {}", node.site),
        }
    }
}

/// Where a link is cut: (namespace, interface).
fn switch_of(slot: Slot, link: Link) -> (String, String) {
    match link {
        Link::InterSite => (slot.router_netns(Site::A), "isl".to_owned()),
        Link::Uplink(site) => (slot.router_netns(site), "uplink".to_owned()),
        Link::Node(node) => (slot.router_netns(node.site), slot.node_port_if(node)),
    }
}

fn cut_table(interface: &str) -> String {
    format!("tsc-cut-{interface}")
}

fn ip(args: &[&str]) -> Result<(), HarnessError> {
    run("ip", args).map(drop)
}

fn ip_in(netns: &str, args: &[&str]) -> Result<(), HarnessError> {
    run_in(netns, "ip", args).map(drop)
}

fn sysctl_in(netns: &str, key_value: &str) -> Result<(), HarnessError> {
    run_in(netns, "sysctl", &["-q", "-w", key_value]).map(drop)
}

/// Builds the control plane's address, both routers with their switches
/// and links, and the routes between them. Nodes are added by [`add_node`].
pub fn create_backbone(slot: Slot) -> Result<(), HarnessError> {
    let cp_bridge = slot.control_plane_bridge();
    ip(&["link", "add", &cp_bridge, "type", "bridge"])?;
    ip(&[
        "addr",
        "add",
        &format!("{}/32", slot.control_plane_ip()),
        "dev",
        &cp_bridge,
    ])?;
    ip(&["link", "set", &cp_bridge, "up"])?;

    for site in Site::ALL {
        let router = slot.router_netns(site);
        ip(&["netns", "add", &router])?;
        ip_in(&router, &["link", "set", "lo", "up"])?;
        sysctl_in(&router, "net.ipv4.ip_forward=1")?;
        ip_in(&router, &["link", "add", "sw", "type", "bridge"])?;
        ip_in(
            &router,
            &[
                "addr",
                "add",
                &format!("{}/24", slot.site_gateway(site)),
                "dev",
                "sw",
            ],
        )?;
        ip_in(&router, &["link", "set", "sw", "up"])?;

        // The uplink: host end in the host, router end `uplink` in the router.
        let host_if = slot.uplink_host_if(site);
        let (host_ip, router_ip) = slot.uplink_ips(site);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "uplink", "netns", &router,
        ])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip_in(
            &router,
            &["addr", "add", &format!("{router_ip}/30"), "dev", "uplink"],
        )?;
        ip_in(&router, &["link", "set", "uplink", "up"])?;
        // The host reaches the site's nodes and pods through it, and nothing
        // else: the host never forwards between sites.
        let via = router_ip.to_string();
        ip(&[
            "route",
            "replace",
            &cidr(slot.site_network(site)),
            "via",
            &via,
            "dev",
            &host_if,
        ])?;
        ip(&[
            "route",
            "replace",
            &cidr(site_pod_range(slot, site)),
            "via",
            &via,
            "dev",
            &host_if,
        ])?;
        ip_in(
            &router,
            &[
                "route",
                "replace",
                &format!("{}/32", slot.control_plane_ip()),
                "via",
                &host_ip.to_string(),
                "dev",
                "uplink",
            ],
        )?;
    }

    // The inter-site link, created straight between the two routers.
    let (ra, rb) = (slot.router_netns(Site::A), slot.router_netns(Site::B));
    ip_in(
        &ra,
        &[
            "link", "add", "isl", "type", "veth", "peer", "name", "isl", "netns", &rb,
        ],
    )?;
    for site in Site::ALL {
        let router = slot.router_netns(site);
        let mine = slot.intersite_ip(site);
        let theirs = slot.intersite_ip(site.other());
        ip_in(
            &router,
            &["addr", "add", &format!("{mine}/30"), "dev", "isl"],
        )?;
        ip_in(&router, &["link", "set", "isl", "up"])?;
        let other = site.other();
        for net in [slot.site_network(other), site_pod_range(slot, other)] {
            ip_in(
                &router,
                &[
                    "route",
                    "replace",
                    &cidr(net),
                    "via",
                    &theirs.to_string(),
                    "dev",
                    "isl",
                ],
            )?;
        }
    }
    Ok(())
}

/// All pod CIDRs of `site` (8 consecutive /24s).
pub fn site_pod_range(slot: Slot, site: Site) -> (std::net::Ipv4Addr, u8) {
    let first = NodeId { site, index: 1 };
    (slot.pod_cidr(first).0, 21)
}

/// Creates `node`'s namespace and plugs it into its site's switch.
pub fn add_node(slot: Slot, node: NodeId) -> Result<(), HarnessError> {
    let ns = slot.node_netns(node);
    let router = slot.router_netns(node.site);
    let port = slot.node_port_if(node);
    ip(&["netns", "add", &ns])?;
    ip_in(
        &router,
        &[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ],
    )?;
    ip_in(&router, &["link", "set", &port, "master", "sw", "up"])?;
    ip_in(&ns, &["link", "set", "lo", "up"])?;
    ip_in(
        &ns,
        &[
            "addr",
            "add",
            &format!("{}/24", slot.node_ip(node)),
            "dev",
            "eth0",
        ],
    )?;
    ip_in(&ns, &["link", "set", "eth0", "up"])?;
    ip_in(
        &ns,
        &[
            "route",
            "replace",
            "default",
            "via",
            &slot.site_gateway(node.site).to_string(),
        ],
    )?;
    // Pods' traffic is routed by the node (the CNI bridge is its gateway).
    sysctl_in(&ns, "net.ipv4.ip_forward=1")?;
    ip_in(
        &router,
        &[
            "route",
            "replace",
            &cidr(slot.pod_cidr(node)),
            "via",
            &slot.node_ip(node).to_string(),
            "dev",
            "sw",
        ],
    )?;
    Ok(())
}

/// Limits the inter-site link to `mbit` Mbit/s each way (tbf on both
/// routers' ends), as a WAN between two rooms; `None` lifts the limit.
/// Latency cannot come from the kernel here (no netem): put a delaying
/// proxy in the path where it matters.
pub fn limit_intersite(slot: Slot, mbit: Option<u32>) -> Result<(), HarnessError> {
    for site in Site::ALL {
        let router = slot.router_netns(site);
        // Deleting a root qdisc that is the default fails: ignore.
        let _ = run_in(&router, "tc", &["qdisc", "del", "dev", "isl", "root"]);
        if let Some(mbit) = mbit {
            let rate = format!("{mbit}mbit");
            // A burst of at least one timer tick's worth at this rate.
            let burst = format!("{}kb", (mbit / 8).max(32));
            run_in(
                &router,
                "tc",
                &[
                    "qdisc", "add", "dev", "isl", "root", "tbf", "rate", &rate, "burst", &burst,
                    "latency", "50ms",
                ],
            )?;
        }
    }
    Ok(())
}

/// Unplugs `node` and deletes its namespace. The link goes first: a
/// namespace is destroyed asynchronously, after its last user, and its end
/// of the veth pair with it; a new namespace of the same name must not
/// race the old one's port.
pub fn remove_node(slot: Slot, node: NodeId) -> Result<(), HarnessError> {
    let router = slot.router_netns(node.site);
    let port = slot.node_port_if(node);
    if run_in(&router, "ip", &["link", "show", &port]).is_ok() {
        ip_in(&router, &["link", "delete", &port])?;
    }
    ip(&["netns", "delete", &slot.node_netns(node)])
}

/// Cuts `link`: from now on it drops every packet both ways. Idempotent.
pub fn cut(slot: Slot, link: Link) -> Result<(), HarnessError> {
    let (ns, interface) = switch_of(slot, link);
    let table = cut_table(&interface);
    let rules = format!(
        "table netdev {table} {{\n\
         \x20 chain in {{ type filter hook ingress device \"{interface}\" priority -500; policy drop; }}\n\
         \x20 chain out {{ type filter hook egress device \"{interface}\" priority -500; policy drop; }}\n\
         }}\n"
    );
    // `nft -f` of a table that exists adds to it: harmless, same rules.
    run_in_with_stdin(&ns, "nft", &["-f", "-"], &rules).map(drop)
}

/// Restores `link`. Idempotent.
pub fn restore(slot: Slot, link: Link) -> Result<(), HarnessError> {
    let (ns, interface) = switch_of(slot, link);
    let table = cut_table(&interface);
    if is_cut(slot, link)? {
        run_in(&ns, "nft", &["delete", "table", "netdev", &table])?;
    }
    Ok(())
}

/// Whether `link` is cut, read from the router's own nftables.
pub fn is_cut(slot: Slot, link: Link) -> Result<bool, HarnessError> {
    let (ns, interface) = switch_of(slot, link);
    let tables = run_in(&ns, "nft", &["list", "tables", "netdev"])?;
    let table = cut_table(&interface);
    Ok(tables
        .lines()
        .any(|line| line.split_whitespace().last() == Some(table.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_link_has_its_own_switch() {
        let slot = Slot::new(2).expect("valid");
        let a1 = NodeId::new(Site::A, 1).expect("valid");
        let a2 = NodeId::new(Site::A, 2).expect("valid");
        let links = [
            Link::InterSite,
            Link::Uplink(Site::A),
            Link::Uplink(Site::B),
            Link::Node(a1),
            Link::Node(a2),
        ];
        let switches: std::collections::HashSet<_> =
            links.iter().map(|&l| switch_of(slot, l)).collect();
        assert_eq!(switches.len(), links.len());
    }

    #[test]
    fn a_site_s_pod_range_holds_its_nodes_pod_cidrs() {
        let slot = Slot::new(5).expect("valid");
        for site in Site::ALL {
            let (range, bits) = site_pod_range(slot, site);
            let mask = u32::MAX << (32 - bits);
            for i in 1..=8 {
                let node = NodeId::new(site, i).expect("valid");
                assert_eq!(
                    u32::from(slot.pod_cidr(node).0) & mask,
                    u32::from(range),
                    "{node}"
                );
                let other = NodeId::new(site.other(), i).expect("valid");
                assert_ne!(u32::from(slot.pod_cidr(other).0) & mask, u32::from(range));
            }
        }
    }
}
