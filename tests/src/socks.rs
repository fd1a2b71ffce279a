//! A minimal SOCKS5 client written from RFC 1928, independent of the codec
//! under test.
//!
//! ```text
//! greeting: VER=5 NMETHODS METHODS...      -> VER=5 METHOD
//! request:  VER=5 CMD RSV=0 ATYP DST.ADDR DST.PORT
//! reply:    VER=5 REP RSV=0 ATYP BND.ADDR BND.PORT
//! ATYP: 1 = IPv4 (4 bytes), 3 = domain (length byte + name), 4 = IPv6 (16 bytes)
//! ```

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub const VERSION: u8 = 5;
pub const METHOD_NO_AUTH: u8 = 0;
pub const CMD_CONNECT: u8 = 1;
pub const CMD_BIND: u8 = 2;
pub const CMD_UDP_ASSOCIATE: u8 = 3;
pub const ATYP_IPV4: u8 = 1;
pub const ATYP_DOMAIN: u8 = 3;
pub const ATYP_IPV6: u8 = 4;
pub const REP_SUCCEEDED: u8 = 0x00;
pub const REP_GENERAL_FAILURE: u8 = 0x01;
pub const REP_HOST_UNREACHABLE: u8 = 0x04;
pub const REP_CONNECTION_REFUSED: u8 = 0x05;
pub const REP_COMMAND_NOT_SUPPORTED: u8 = 0x07;
pub const REP_ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;

/// Bound on each step of a handshake.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// DST or BND address of a request or reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Ip(SocketAddr),
    Domain(String, u16),
}

impl From<SocketAddr> for Target {
    fn from(a: SocketAddr) -> Self {
        Self::Ip(a)
    }
}

impl Target {
    /// Appends ATYP, address and port.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let port = match self {
            Self::Ip(SocketAddr::V4(a)) => {
                out.push(ATYP_IPV4);
                out.extend_from_slice(&a.ip().octets());
                a.port()
            }
            Self::Ip(SocketAddr::V6(a)) => {
                out.push(ATYP_IPV6);
                out.extend_from_slice(&a.ip().octets());
                a.port()
            }
            Self::Domain(name, port) => {
                let len = u8::try_from(name.len()).expect("domain longer than 255 bytes");
                out.push(ATYP_DOMAIN);
                out.push(len);
                out.extend_from_slice(name.as_bytes());
                *port
            }
        };
        out.extend_from_slice(&port.to_be_bytes());
    }
}

/// The greeting offering only "no authentication".
pub fn greeting() -> Vec<u8> {
    vec![VERSION, 1, METHOD_NO_AUTH]
}

/// A request with command `cmd` for `target`.
pub fn request(cmd: u8, target: &Target) -> Vec<u8> {
    let mut v = vec![VERSION, cmd, 0];
    target.encode(&mut v);
    v
}

/// A parsed reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u8,
    pub bound: Target,
}

/// Reads the method selection; fails unless it is VER=5 METHOD=no-auth.
pub async fn read_method(s: &mut TcpStream) -> io::Result<()> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await?;
    if b != [VERSION, METHOD_NO_AUTH] {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("method selection {b:02x?}, expected [05, 00]"),
        ));
    }
    Ok(())
}

/// Reads exactly one reply, not a byte more (payload may follow it).
pub async fn read_reply(s: &mut TcpStream) -> io::Result<Reply> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    let [ver, code, _rsv, atyp] = head;
    if ver != VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("reply version {ver}"),
        ));
    }
    let ip = match atyp {
        ATYP_IPV4 => {
            let mut a = [0u8; 4];
            s.read_exact(&mut a).await?;
            Some(IpAddr::V4(Ipv4Addr::from(a)))
        }
        ATYP_IPV6 => {
            let mut a = [0u8; 16];
            s.read_exact(&mut a).await?;
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        ATYP_DOMAIN => None,
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply ATYP {other} (code {code:#04x})"),
            ))
        }
    };
    let name = if ip.is_none() {
        let len = s.read_u8().await?;
        let mut n = vec![0u8; usize::from(len)];
        s.read_exact(&mut n).await?;
        Some(String::from_utf8_lossy(&n).into_owned())
    } else {
        None
    };
    let port = s.read_u16().await?;
    let bound = match (ip, name) {
        (Some(ip), _) => Target::Ip(SocketAddr::new(ip, port)),
        (None, Some(n)) => Target::Domain(n, port),
        (None, None) => unreachable!(),
    };
    Ok(Reply { code, bound })
}

/// Performs a handshake with command `cmd` and returns the stream positioned
/// right after the reply, whatever the reply code.
///
/// With `pipelined = Some(payload)` the greeting, the request and `payload`
/// go out in a single write before anything is read, as clients that
/// optimise round trips do; otherwise each step waits for the previous answer.
pub async fn handshake(
    proxy: SocketAddr,
    cmd: u8,
    target: &Target,
    pipelined: Option<&[u8]>,
) -> io::Result<(TcpStream, Reply)> {
    // Each read has its own bound below; this one also covers the writes.
    tokio::time::timeout(
        HANDSHAKE_LIMIT * 2,
        handshake_steps(proxy, cmd, target, pipelined),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "SOCKS5 handshake: timed out"))?
}

async fn handshake_steps(
    proxy: SocketAddr,
    cmd: u8,
    target: &Target,
    pipelined: Option<&[u8]>,
) -> io::Result<(TcpStream, Reply)> {
    let step = |what: &'static str| {
        move |_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("SOCKS5 handshake: timed out at {what}"),
            )
        }
    };
    let mut s = tokio::time::timeout(HANDSHAKE_LIMIT, TcpStream::connect(proxy))
        .await
        .map_err(step("connect"))??;
    s.set_nodelay(true)?;
    match pipelined {
        Some(payload) => {
            let mut all = greeting();
            all.extend_from_slice(&request(cmd, target));
            all.extend_from_slice(payload);
            s.write_all(&all).await?;
            tokio::time::timeout(HANDSHAKE_LIMIT, read_method(&mut s))
                .await
                .map_err(step("method selection"))??;
        }
        None => {
            s.write_all(&greeting()).await?;
            tokio::time::timeout(HANDSHAKE_LIMIT, read_method(&mut s))
                .await
                .map_err(step("method selection"))??;
            s.write_all(&request(cmd, target)).await?;
        }
    }
    let reply = tokio::time::timeout(HANDSHAKE_LIMIT, read_reply(&mut s))
        .await
        .map_err(step("reply"))??;
    Ok((s, reply))
}

/// CONNECT to `target` step by step; an error unless the reply is success.
pub async fn try_connect(
    proxy: SocketAddr,
    target: impl Into<Target>,
) -> Result<TcpStream, String> {
    let target = target.into();
    let (s, reply) = handshake(proxy, CMD_CONNECT, &target, None)
        .await
        .map_err(|e| format!("CONNECT {target:?} via {proxy}: {e}"))?;
    if reply.code != REP_SUCCEEDED {
        return Err(format!(
            "CONNECT {target:?} via {proxy}: reply code {:#04x}",
            reply.code
        ));
    }
    Ok(s)
}

/// [`try_connect`] that panics on failure.
pub async fn connect(proxy: SocketAddr, target: impl Into<Target>) -> TcpStream {
    try_connect(proxy, target)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}
