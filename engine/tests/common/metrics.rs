//! Scraping a process's Prometheus endpoint as a monitoring system would:
//! a plain HTTP/1.0 `GET /metrics` (no chunked encoding, the connection
//! closed after the body), the whole response returned as text for
//! `contains` checks on exposition lines.

use std::io::{Read, Write};
use std::time::Duration;

/// `GET /metrics` from `addr` (`HOST:PORT`): the response, headers and
/// body.
pub fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("send the metrics request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the metrics");
    out
}
