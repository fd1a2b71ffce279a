//! A minimal SOCKS4 / SOCKS4a client, written from the protocol descriptions
//! (`SOCKS4.protocol`, `SOCKS4A.protocol`), independent of the codec under test.
//!
//! ```text
//! request: VN=4 CD DSTPORT(2) DSTIP(4) USERID NUL             CD: 1 = CONNECT, 2 = BIND
//! 4a:      VN=4 CD DSTPORT(2) 0.0.0.x USERID NUL HOSTNAME NUL  (x != 0)
//! reply:   VN=0 CD DSTPORT(2) DSTIP(4)                         CD: 90 granted, 91 rejected
//! ```

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::socks::HANDSHAKE_LIMIT;

pub const VERSION: u8 = 4;
pub const CMD_CONNECT: u8 = 1;
pub const CMD_BIND: u8 = 2;
pub const GRANTED: u8 = 90;
pub const REJECTED: u8 = 91;

/// A SOCKS4 request for an IPv4 literal.
pub fn request(cmd: u8, dst: SocketAddrV4, user_id: &str) -> Vec<u8> {
    let mut v = vec![VERSION, cmd];
    v.extend_from_slice(&dst.port().to_be_bytes());
    v.extend_from_slice(&dst.ip().octets());
    v.extend_from_slice(user_id.as_bytes());
    v.push(0);
    v
}

/// A SOCKS4a request for a host name (DSTIP 0.0.0.1).
pub fn request_4a(cmd: u8, host: &str, port: u16, user_id: &str) -> Vec<u8> {
    let mut v = vec![VERSION, cmd];
    v.extend_from_slice(&port.to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, 1]);
    v.extend_from_slice(user_id.as_bytes());
    v.push(0);
    v.extend_from_slice(host.as_bytes());
    v.push(0);
    v
}

/// A parsed 8-byte reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u8,
    pub addr: SocketAddrV4,
}

/// Reads exactly one reply (8 bytes); fails unless VN is 0.
pub async fn read_reply(s: &mut TcpStream) -> io::Result<Reply> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b).await?;
    if b[0] != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SOCKS4 reply {b:02x?}: VN is not 0"),
        ));
    }
    let port = u16::from_be_bytes([b[2], b[3]]);
    let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
    Ok(Reply {
        code: b[1],
        addr: SocketAddrV4::new(ip, port),
    })
}

/// Connects to `proxy`, sends `request` and reads the reply, each step bounded.
pub async fn handshake(proxy: SocketAddr, request: &[u8]) -> io::Result<(TcpStream, Reply)> {
    let mut s = tokio::time::timeout(HANDSHAKE_LIMIT, TcpStream::connect(proxy))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "SOCKS4: connect timed out"))??;
    s.set_nodelay(true)?;
    s.write_all(request).await?;
    let reply = tokio::time::timeout(HANDSHAKE_LIMIT, read_reply(&mut s))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "SOCKS4: timed out at reply"))??;
    Ok((s, reply))
}
