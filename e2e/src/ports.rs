//! Free loopback ports, chosen at run time so that concurrent tests (and other
//! engineers' runs on the same machine) never collide on a fixed port.
//!
//! The port is found by binding port 0 and released before the component
//! binds it; the short window is covered by remembering every port handed out
//! in this process, so two components of one test run never get the same one.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, TcpListener},
    sync::{Mutex, OnceLock},
};

use crate::HarnessError;

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> Result<u16, HarnessError> {
    for _ in 0..64 {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(HarnessError::NoFreePort)?;
        let port = listener
            .local_addr()
            .map_err(HarnessError::NoFreePort)?
            .port();
        // A poisoned lock only means another test panicked while holding it;
        // the set itself is still a valid set of ports.
        let mut ports = handed_out().lock().unwrap_or_else(|p| p.into_inner());
        if ports.insert(port) {
            return Ok(port);
        }
    }
    Err(HarnessError::NoFreePort(std::io::Error::other(
        "every port the kernel offered was already handed out",
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_not_handed_out_twice() {
        let mut seen = HashSet::new();
        for _ in 0..20 {
            let port = free_port().expect("a free port");
            assert!(port > 0);
            assert!(seen.insert(port), "port {port} handed out twice");
        }
    }
}
