//! Names and addresses of one stretched cluster, derived from its slot: pure
//! functions, so the harness that builds a cluster, the sweep that removes a
//! crashed one's leftovers and the tests that check from outside all agree
//! on what belongs to whom.
//!
//! A slot (0..[`SLOTS`]) is taken by holding its lock file (see `slot.rs`).
//! Everything of slot `s` on the host carries the prefix `tsc<s>-` (network
//! namespaces, host interfaces, cgroups) or lives under its root directory,
//! so that clusters of concurrent tests never collide, and a sweep of one
//! slot touches nothing of another slot's nor anyone else's.
//!
//! Addresses (slot `s`, `k = 16·s`; nothing else on the machine uses
//! 10.250/16, 10.251/16 or 10.252/16):
//!
//! | what | address |
//! | --- | --- |
//! | the control plane (kube-apiserver), on host bridge `tsc<s>-cp` | 10.250.k.1/32 |
//! | link site A ↔ control plane (host end, router end) | 10.250.k.5/30, .6 |
//! | link site B ↔ control plane | 10.250.k.9/30, .10 |
//! | link site A ↔ site B (router A, router B) | 10.250.k.13/30, .14 |
//! | site A's node network (router .1, node i at .10+i) | 10.250.(k+1).0/24 |
//! | site B's node network | 10.250.(k+2).0/24 |
//! | pods: node i of site A / B | 10.251.(k+i-1).0/24 / 10.251.(k+8+i-1).0/24 |
//! | Services (the `kubernetes` Service is .1) | 10.252.s.0/24 |

use std::{
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    str::FromStr,
};

/// How many clusters can run on one machine at once.
pub const SLOTS: u8 = 16;
/// At most this many nodes per site (the pod-CIDR plan has room for 8).
pub const MAX_NODES_PER_SITE: u8 = 8;
/// The prefix of every host-global name of ours.
pub const PREFIX: &str = "tsc";
/// Where clusters keep their files unless `TWINVOL_CLUSTER_ROOT` says otherwise.
pub const DEFAULT_ROOT: &str = "/var/lib/twinvol-cluster";
/// The environment variable overriding [`DEFAULT_ROOT`].
pub const ROOT_ENV: &str = "TWINVOL_CLUSTER_ROOT";
/// The label every node carries with its site's name.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The directory all clusters' files live under.
pub fn base_dir() -> PathBuf {
    std::env::var_os(ROOT_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
}

/// One of the two sites. The control plane is the third location.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    A,
    B,
}

impl Site {
    pub const ALL: [Site; 2] = [Site::A, Site::B];

    /// The short letter used in names (`a`, `b`).
    pub fn letter(self) -> char {
        match self {
            Site::A => 'a',
            Site::B => 'b',
        }
    }

    /// The zone label value and Site object name: `site-a`, `site-b`.
    pub fn zone(self) -> String {
        format!("site-{}", self.letter())
    }

    pub fn other(self) -> Site {
        match self {
            Site::A => Site::B,
            Site::B => Site::A,
        }
    }

    fn index(self) -> u8 {
        match self {
            Site::A => 0,
            Site::B => 1,
        }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.zone())
    }
}

impl FromStr for Site {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "a" | "site-a" => Ok(Site::A),
            "b" | "site-b" => Ok(Site::B),
            _ => Err(format!("no site {s:?} (sites: a, b)")),
        }
    }
}

/// A node: its site and its 1-based index within the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    pub site: Site,
    pub index: u8,
}

impl NodeId {
    /// `index` must be in 1..=[`MAX_NODES_PER_SITE`].
    pub fn new(site: Site, index: u8) -> Result<Self, String> {
        if (1..=MAX_NODES_PER_SITE).contains(&index) {
            Ok(Self { site, index })
        } else {
            Err(format!(
                "node index {index} out of range 1..={MAX_NODES_PER_SITE}"
            ))
        }
    }

    /// The short name used in host-global names: `a1`.
    pub fn short(self) -> String {
        format!("{}{}", self.site.letter(), self.index)
    }

    /// The Kubernetes node name: `node-a1`.
    pub fn node_name(self) -> String {
        format!("node-{}", self.short())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.node_name())
    }
}

impl FromStr for NodeId {
    type Err = String;
    /// `a1`, `node-a1`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let short = s.strip_prefix("node-").unwrap_or(s);
        let mut chars = short.chars();
        let site: Site = chars
            .next()
            .ok_or_else(|| format!("no node {s:?}"))?
            .to_string()
            .parse()?;
        let index: u8 = chars
            .as_str()
            .parse()
            .map_err(|_| format!("no node {s:?} (nodes look like a1, node-b2)"))?;
        Self::new(site, index)
    }
}

/// A cluster's slot: picks its names and addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot(u8);

impl Slot {
    pub fn new(n: u8) -> Result<Self, String> {
        if n < SLOTS {
            Ok(Self(n))
        } else {
            Err(format!("slot {n} out of range 0..{SLOTS}"))
        }
    }

    pub fn all() -> impl Iterator<Item = Slot> {
        (0..SLOTS).map(Slot)
    }

    pub fn number(self) -> u8 {
        self.0
    }

    /// `tsc<s>-`: the start of every host-global name of this slot.
    pub fn prefix(self) -> String {
        format!("{PREFIX}{}-", self.0)
    }

    /// Where this slot's cluster keeps its files (nodes' disks, control plane).
    pub fn root(self, base: &Path) -> PathBuf {
        base.join(format!("{PREFIX}{}", self.0))
    }

    fn third(self, offset: u8) -> u8 {
        self.0 * 16 + offset
    }

    /// The control plane's address (kube-apiserver binds it).
    pub fn control_plane_ip(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.third(0), 1)
    }

    /// The host bridge holding [`Self::control_plane_ip`]: an interface with
    /// no ports, so the address is up whatever happens to the links.
    pub fn control_plane_bridge(self) -> String {
        format!("{}cp", self.prefix())
    }

    /// The host and router ends of the link between `site` and the control plane.
    pub fn uplink_ips(self, site: Site) -> (Ipv4Addr, Ipv4Addr) {
        let base = 4 + 4 * site.index();
        (
            Ipv4Addr::new(10, 250, self.third(0), base + 1),
            Ipv4Addr::new(10, 250, self.third(0), base + 2),
        )
    }

    /// The host end's interface name of `site`'s control-plane link.
    pub fn uplink_host_if(self, site: Site) -> String {
        format!("{}{}-cp", self.prefix(), site.letter())
    }

    /// Router `site`'s end of the inter-site link.
    pub fn intersite_ip(self, site: Site) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.third(0), 13 + site.index())
    }

    /// The network namespace of `site`'s router: its switch (a bridge the
    /// nodes' links plug into), the inter-site link and its control-plane link.
    pub fn router_netns(self, site: Site) -> String {
        format!("{}r{}", self.prefix(), site.letter())
    }

    /// `site`'s node network.
    pub fn site_network(self, site: Site) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, 250, self.third(1 + site.index()), 0), 24)
    }

    /// The router's address on `site`'s node network (the nodes' gateway).
    pub fn site_gateway(self, site: Site) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.third(1 + site.index()), 1)
    }

    pub fn node_ip(self, node: NodeId) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.third(1 + node.site.index()), 10 + node.index)
    }

    /// The node's pod CIDR (a /24).
    pub fn pod_cidr(self, node: NodeId) -> (Ipv4Addr, u8) {
        let n = node.site.index() * MAX_NODES_PER_SITE + node.index - 1;
        (Ipv4Addr::new(10, 251, self.third(n), 0), 24)
    }

    /// Every pod CIDR of this slot.
    pub fn cluster_cidr(self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, 251, self.third(0), 0), 20)
    }

    /// The Service ClusterIP range.
    pub fn service_cidr(self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, 252, self.0, 0), 24)
    }

    /// The `kubernetes` Service's ClusterIP.
    pub fn kubernetes_service_ip(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 252, self.0, 1)
    }

    pub fn node_netns(self, node: NodeId) -> String {
        format!("{}{}", self.prefix(), node.short())
    }

    /// The node's cgroup (the same path in every v1 controller) and the
    /// kubelet's `cgroupRoot`: everything of the node runs below it.
    pub fn node_cgroup(self, node: NodeId) -> String {
        format!("{}{}", self.prefix(), node.short())
    }

    /// The name of the node's link in its router's namespace (the port of
    /// the site switch); inside the node it is `eth0`.
    pub fn node_port_if(self, node: NodeId) -> String {
        format!("p-{}", node.short())
    }
}

/// `a.b.c.d/n`.
pub fn cidr(net: (Ipv4Addr, u8)) -> String {
    format!("{}/{}", net.0, net.1)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn nodes() -> Vec<NodeId> {
        Site::ALL
            .iter()
            .flat_map(|&site| {
                (1..=MAX_NODES_PER_SITE).map(move |i| NodeId::new(site, i).expect("in range"))
            })
            .collect()
    }

    #[test]
    fn no_two_slots_or_nodes_share_an_address_or_a_name() {
        let mut addrs = HashSet::new();
        let mut names = HashSet::new();
        let mut nets = HashSet::new();
        for slot in Slot::all() {
            assert!(addrs.insert(slot.control_plane_ip()));
            for site in Site::ALL {
                let (h, r) = slot.uplink_ips(site);
                assert!(addrs.insert(h) && addrs.insert(r));
                assert!(addrs.insert(slot.intersite_ip(site)));
                assert!(addrs.insert(slot.site_gateway(site)));
                assert!(names.insert(slot.router_netns(site)));
                assert!(names.insert(slot.uplink_host_if(site)));
                assert!(nets.insert(slot.site_network(site)));
            }
            assert!(names.insert(slot.control_plane_bridge()));
            assert!(nets.insert(slot.service_cidr()));
            for node in nodes() {
                assert!(addrs.insert(slot.node_ip(node)), "{node} in {slot:?}");
                assert!(nets.insert(slot.pod_cidr(node)), "{node} in {slot:?}");
                assert!(names.insert(slot.node_netns(node)));
            }
        }
    }

    #[test]
    fn host_interface_names_fit_the_kernel_limit() {
        for slot in Slot::all() {
            for name in [
                slot.control_plane_bridge(),
                slot.uplink_host_if(Site::A),
                slot.uplink_host_if(Site::B),
            ] {
                assert!(name.len() <= 15, "{name}");
            }
        }
    }

    #[test]
    fn addresses_stay_in_the_slot_s_ranges() {
        let slot = Slot::new(15).expect("valid");
        let (cluster, bits) = slot.cluster_cidr();
        let mask = u32::MAX << (32 - bits);
        for node in nodes() {
            let (pods, _) = slot.pod_cidr(node);
            assert_eq!(u32::from(pods) & mask, u32::from(cluster), "{node}");
        }
        assert_eq!(
            slot.node_ip(NodeId::new(Site::B, 8).expect("valid"))
                .octets()[2],
            242
        );
    }

    #[test]
    fn node_names_round_trip() {
        for node in nodes() {
            assert_eq!(node.short().parse::<NodeId>(), Ok(node));
            assert_eq!(node.node_name().parse::<NodeId>(), Ok(node));
        }
        assert!("c1".parse::<NodeId>().is_err());
        assert!("a9".parse::<NodeId>().is_err());
        assert!("a".parse::<NodeId>().is_err());
        assert_eq!("site-b".parse::<Site>(), Ok(Site::B));
    }
}
