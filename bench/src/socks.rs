//! A minimal SOCKS5 client (RFC 1928): no-authentication greeting and CONNECT to an IPv4
//! address. Blocking and tokio flavours; both bounded by timeouts.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GREETING: [u8; 3] = [5, 1, 0];

fn connect_request(target: SocketAddrV4) -> [u8; 10] {
    let ip = target.ip().octets();
    let port = target.port().to_be_bytes();
    [5, 1, 0, 1, ip[0], ip[1], ip[2], ip[3], port[0], port[1]]
}

fn check_method(reply: [u8; 2]) -> Result<()> {
    match reply {
        [5, 0] => Ok(()),
        [5, 0xff] => bail!("SOCKS5 server accepts no offered method (no-auth refused)"),
        [5, m] => bail!("SOCKS5 server chose method {m:#04x}, only no-auth (0x00) was offered"),
        [v, _] => bail!("not a SOCKS5 server: greeting reply version {v}"),
    }
}

/// Checks the first four bytes of the CONNECT reply; returns how many bytes of bound address
/// and port follow (None: a domain name, whose length byte comes next).
fn check_reply_head(head: [u8; 4]) -> Result<Option<usize>> {
    if head[0] != 5 {
        bail!("CONNECT reply version {}", head[0]);
    }
    if head[1] != 0 {
        let why = match head[1] {
            1 => "general failure",
            2 => "not allowed by ruleset",
            3 => "network unreachable",
            4 => "host unreachable",
            5 => "connection refused",
            6 => "TTL expired",
            7 => "command not supported",
            8 => "address type not supported",
            _ => "unknown reply code",
        };
        bail!("CONNECT refused: reply {} ({why})", head[1]);
    }
    match head[3] {
        1 => Ok(Some(4 + 2)),
        4 => Ok(Some(16 + 2)),
        3 => Ok(None),
        t => bail!("CONNECT reply with unknown address type {t}"),
    }
}

/// Opens a TCP connection to `target`, through the SOCKS5 server `proxy` when given.
/// Every step is bounded by `timeout`; the returned stream has TCP_NODELAY set and no
/// read/write timeout.
pub fn connect(
    proxy: Option<SocketAddr>,
    target: SocketAddrV4,
    timeout: Duration,
) -> Result<TcpStream> {
    let first_hop = proxy.unwrap_or(SocketAddr::V4(target));
    let mut s = TcpStream::connect_timeout(&first_hop, timeout)
        .with_context(|| format!("connect to {first_hop}"))?;
    s.set_nodelay(true)?;
    if proxy.is_some() {
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        handshake(&mut s, target).with_context(|| format!("SOCKS5 handshake with {first_hop}"))?;
        s.set_read_timeout(None)?;
        s.set_write_timeout(None)?;
    }
    Ok(s)
}

fn handshake(s: &mut TcpStream, target: SocketAddrV4) -> Result<()> {
    s.write_all(&GREETING)?;
    let mut m = [0u8; 2];
    s.read_exact(&mut m)?;
    check_method(m)?;
    s.write_all(&connect_request(target))?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    let rest = match check_reply_head(head)? {
        Some(n) => n,
        None => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len)?;
            len[0] as usize + 2
        }
    };
    let mut skip = [0u8; 258];
    s.read_exact(&mut skip[..rest])?;
    Ok(())
}

/// Tokio flavour of [`connect`]; the caller bounds the whole call with a timeout.
pub async fn connect_async(
    proxy: Option<SocketAddr>,
    target: SocketAddrV4,
) -> Result<tokio::net::TcpStream> {
    connect_async_from(None, proxy, target).await
}

/// [`connect_async`] from the loopback address `source` (e.g. 127.0.0.2), its port chosen at
/// connect for that destination (`IP_BIND_ADDRESS_NO_PORT`).
pub async fn connect_async_from(
    source: Option<Ipv4Addr>,
    proxy: Option<SocketAddr>,
    target: SocketAddrV4,
) -> Result<tokio::net::TcpStream> {
    let first_hop = proxy.unwrap_or(SocketAddr::V4(target));
    let connecting = async {
        let Some(ip) = source else {
            return tokio::net::TcpStream::connect(first_hop).await;
        };
        let sock = tokio::net::TcpSocket::new_v4()?;
        let one: libc::c_int = 1;
        // SAFETY: passes a readable int of the stated size on a socket this function owns.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        sock.bind(SocketAddr::new(ip.into(), 0))?;
        sock.connect(first_hop).await
    };
    let mut s = connecting
        .await
        .with_context(|| format!("connect to {first_hop}"))?;
    s.set_nodelay(true)?;
    if proxy.is_some() {
        s.write_all(&GREETING).await?;
        let mut m = [0u8; 2];
        s.read_exact(&mut m)
            .await
            .context("read SOCKS5 method reply")?;
        check_method(m)?;
        s.write_all(&connect_request(target)).await?;
        let mut head = [0u8; 4];
        s.read_exact(&mut head)
            .await
            .context("read SOCKS5 CONNECT reply")?;
        let rest = match check_reply_head(head)? {
            Some(n) => n,
            None => {
                let mut len = [0u8; 1];
                s.read_exact(&mut len).await?;
                len[0] as usize + 2
            }
        };
        let mut skip = [0u8; 258];
        s.read_exact(&mut skip[..rest]).await?;
    }
    Ok(s)
}
