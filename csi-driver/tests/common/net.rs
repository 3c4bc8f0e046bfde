//! A node's network: its own network namespace with a veth to the host
//! (a /30: the host side routes between nodes, as two sites' routers
//! would), and a TCP forwarder on the host side of the veth to the API
//! server on 127.0.0.1 — the only way into the control plane from inside
//! the namespace. Cutting the node's link (`set_link(false)`) cuts it off
//! from the other nodes and the API server at once: a dark site.
//!
//! Names carry a tag derived from the pid and time, so parallel test runs
//! of other engineers never collide; `Drop` removes the namespace and veth.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tag for names: 6 hex digits from the pid and the clock.
pub fn random_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{:06x}",
        (nanos ^ std::process::id().rotate_left(12)) & 0xff_ffff
    )
}

/// One node's namespace and link.
pub struct NodeNet {
    pub ns: String,
    pub host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
    /// Whether the forwarder passes traffic (false while the link is cut,
    /// so that connections already open through it die too).
    open: Arc<AtomicBool>,
}

impl NodeNet {
    /// `tvc-<tag>-<index>`: veth `tvc<tag><index>`, 10.<x>.<y>.0/30.
    pub fn create(tag: &str, index: u8) -> NodeNet {
        let n = u32::from_str_radix(tag, 16).unwrap_or(0);
        let x = 150 + (n % 100) as u8;
        let y = ((n >> 8) as u8 & 0x3f) * 4 + index;
        let net = NodeNet {
            ns: format!("tvc-{tag}-{index}"),
            host_if: format!("tvc{tag}{index}"),
            host_ip: format!("10.{x}.{y}.1"),
            ns_ip: format!("10.{x}.{y}.2"),
            open: Arc::new(AtomicBool::new(true)),
        };
        let peer = format!("{}p", net.host_if);
        ip(&["netns", "add", &net.ns]);
        ip(&[
            "link",
            "add",
            &net.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &net.ns]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", net.host_ip),
            "dev",
            &net.host_if,
        ]);
        ip(&["link", "set", &net.host_if, "up"]);
        let ns_path = format!("/run/netns/{}", net.ns);
        let inside = |args: &[&str]| {
            let out = Command::new("nsenter")
                .arg(format!("--net={ns_path}"))
                .arg("ip")
                .args(args)
                .output()
                .expect("run nsenter ip");
            assert!(
                out.status.success(),
                "ip {} in {}: {}",
                args.join(" "),
                ns_path,
                String::from_utf8_lossy(&out.stderr)
            );
        };
        inside(&["addr", "add", &format!("{}/30", net.ns_ip), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);
        inside(&["route", "add", "default", "via", &net.host_ip]);
        let forwarding = format!("/proc/sys/net/ipv4/conf/{}/forwarding", net.host_if);
        std::fs::write(&forwarding, "1").expect("enable forwarding on the node's veth");
        net
    }

    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.ns)
    }

    /// Brings the node's link down (a dark site) or up again.
    pub fn set_link(&self, up: bool) {
        self.open.store(up, Ordering::SeqCst);
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
        if up {
            // Bringing a link up drops its addresses' routes on some
            // kernels' address lifetimes; make sure the address is there.
            let _ = Command::new("ip")
                .args([
                    "addr",
                    "add",
                    &format!("{}/30", self.host_ip),
                    "dev",
                    &self.host_if,
                ])
                .output();
        }
    }

    /// Forwards `<host_ip>:<port>` to `target` (the API server) and returns
    /// the listening address.
    pub async fn forward_to(&self, target: SocketAddr) -> SocketAddr {
        let listener = TcpListener::bind((self.host_ip.as_str(), 0))
            .await
            .expect("bind the API forwarder");
        let addr = listener.local_addr().expect("bound");
        let open = self.open.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let open = open.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    let watch = async {
                        while open.load(Ordering::SeqCst) {
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    };
                    tokio::select! {
                        _ = copy => {}
                        () = watch => {}
                    }
                });
            }
        });
        addr
    }
}

impl Drop for NodeNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}
