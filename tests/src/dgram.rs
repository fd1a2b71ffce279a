//! Bounded UDP receives for the UDP relay tests.

use std::{net::SocketAddr, time::Duration};

use tokio::net::UdpSocket;

use crate::within;

/// Longest wait for one datagram.
pub const DGRAM_LIMIT: Duration = Duration::from_secs(5);
/// How long a socket must stay silent for "nothing arrived".
pub const QUIET: Duration = Duration::from_millis(500);

/// Receives one datagram within [`DGRAM_LIMIT`]; panics naming `what` otherwise.
pub async fn recv_from(sock: &UdpSocket, what: &str) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65_536];
    let (n, from) = within(DGRAM_LIMIT, what, sock.recv_from(&mut buf))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    buf.truncate(n);
    (buf, from)
}

/// Receives one datagram on a connected socket within [`DGRAM_LIMIT`].
pub async fn recv(sock: &UdpSocket, what: &str) -> Vec<u8> {
    recv_from(sock, what).await.0
}

/// Fails if `sock` receives anything within [`QUIET`].
pub async fn assert_quiet(sock: &UdpSocket, what: &str) {
    let mut buf = vec![0u8; 65_536];
    if let Ok(r) = tokio::time::timeout(QUIET, sock.recv_from(&mut buf)).await {
        let got = r.map(|(n, from)| (buf[..n].to_vec(), from));
        panic!("{what}: expected nothing, got {got:?}");
    }
}
