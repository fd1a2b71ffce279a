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
pub const REP_NETWORK_UNREACHABLE: u8 = 0x03;
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

/// Opens `n` CONNECT sessions through `proxy` to one fresh loopback listener, one after
/// another; returns (client, target) pairs.
pub async fn open_pairs(proxy: SocketAddr, n: usize) -> Vec<(TcpStream, TcpStream)> {
    let l = crate::listen("127.0.0.1:0").await;
    let addr = l.local_addr().expect("listener address");
    let mut pairs = Vec::new();
    for _ in 0..n {
        let client = connect(proxy, addr).await;
        let target = crate::within(
            std::time::Duration::from_secs(30),
            "target accept",
            crate::accept_one(&l),
        )
        .await;
        pairs.push((client, target));
    }
    pairs
}

// ---------------------------------------------------------------------------
// Method negotiation and RFC 1929 username/password authentication.
//
// ```text
// method selection:  VER=5 METHOD          (METHOD X'FF' = no acceptable method)
// RFC 1929 request:  VER=1 ULEN UNAME PLEN PASSWD
// RFC 1929 reply:    VER=1 STATUS          (0 = success, anything else = failure)
// ```
// ---------------------------------------------------------------------------

pub const METHOD_USERPASS: u8 = 0x02;
pub const METHOD_NO_ACCEPTABLE: u8 = 0xFF;
pub const REP_NOT_ALLOWED: u8 = 0x02;
pub const REP_TTL_EXPIRED: u8 = 0x06;

/// A greeting offering exactly `methods`, in that order.
pub fn greeting_methods(methods: &[u8]) -> Vec<u8> {
    let n = u8::try_from(methods.len()).expect("at most 255 methods");
    let mut v = vec![VERSION, n];
    v.extend_from_slice(methods);
    v
}

/// Reads the method selection and returns the chosen METHOD, whatever it is.
pub async fn read_method_choice(s: &mut TcpStream) -> io::Result<u8> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await?;
    if b[0] != VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("method selection {b:02x?}: version is not 5"),
        ));
    }
    Ok(b[1])
}

/// The RFC 1929 sub-negotiation request.
pub fn userpass_request(user: &str, pass: &str) -> Vec<u8> {
    let mut v = vec![1u8];
    for field in [user, pass] {
        v.push(u8::try_from(field.len()).expect("RFC 1929 fields are at most 255 bytes"));
        v.extend_from_slice(field.as_bytes());
    }
    v
}

/// Reads the RFC 1929 reply and returns STATUS.
pub async fn read_auth_status(s: &mut TcpStream) -> io::Result<u8> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await?;
    if b[0] != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("RFC 1929 reply {b:02x?}: version is not 1"),
        ));
    }
    Ok(b[1])
}

/// How a client authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// Offers only X'00'.
    None,
    /// Offers only X'02' and logs in with (user, password).
    UserPass(String, String),
}

impl Auth {
    pub fn user(user: &str, pass: &str) -> Self {
        Self::UserPass(user.to_owned(), pass.to_owned())
    }
}

/// Connects to `proxy` from an address of our choosing (`local` port 0), e.g. 127.0.0.2
/// to look like another client.
pub async fn tcp_connect_from(local: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let sock = if local.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(local, 0))?;
    let s = tokio::time::timeout(HANDSHAKE_LIMIT, sock.connect(to))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Greeting (with `auth`), authentication, then request `cmd` for `target`; returns the
/// stream right after the reply, whatever its code. Any deviation before the request (the
/// server picks another method, authentication fails) is an error. Every step is bounded.
pub async fn handshake_auth(
    proxy: SocketAddr,
    auth: &Auth,
    cmd: u8,
    target: &Target,
) -> io::Result<(TcpStream, Reply)> {
    let s = tokio::time::timeout(HANDSHAKE_LIMIT, TcpStream::connect(proxy))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "SOCKS5: connect timed out"))??;
    s.set_nodelay(true)?;
    handshake_on(s, auth, cmd, target).await
}

/// [`handshake_auth`] on an already connected stream.
pub async fn handshake_on(
    mut s: TcpStream,
    auth: &Auth,
    cmd: u8,
    target: &Target,
) -> io::Result<(TcpStream, Reply)> {
    let timed_out = |what: &str| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("SOCKS5 handshake: timed out at {what}"),
        )
    };
    let (methods, want) = match auth {
        Auth::None => (vec![METHOD_NO_AUTH], METHOD_NO_AUTH),
        Auth::UserPass(..) => (vec![METHOD_USERPASS], METHOD_USERPASS),
    };
    s.write_all(&greeting_methods(&methods)).await?;
    let m = tokio::time::timeout(HANDSHAKE_LIMIT, read_method_choice(&mut s))
        .await
        .map_err(|_| timed_out("method selection"))??;
    if m != want {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("server chose method {m:#04x}, expected {want:#04x}"),
        ));
    }
    if let Auth::UserPass(user, pass) = auth {
        s.write_all(&userpass_request(user, pass)).await?;
        let status = tokio::time::timeout(HANDSHAKE_LIMIT, read_auth_status(&mut s))
            .await
            .map_err(|_| timed_out("RFC 1929 reply"))??;
        if status != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("RFC 1929 status {status:#04x} for user {user:?}"),
            ));
        }
    }
    s.write_all(&request(cmd, target)).await?;
    let reply = tokio::time::timeout(HANDSHAKE_LIMIT, read_reply(&mut s))
        .await
        .map_err(|_| timed_out("reply"))??;
    Ok((s, reply))
}

/// Returns the reply code of a CONNECT, after authenticating with `auth`; the stream is
/// returned on success only.
pub async fn connect_auth(
    proxy: SocketAddr,
    auth: &Auth,
    target: impl Into<Target>,
) -> Result<TcpStream, String> {
    let target = target.into();
    let (s, reply) = handshake_auth(proxy, auth, CMD_CONNECT, &target)
        .await
        .map_err(|e| format!("CONNECT {target:?} via {proxy} ({auth:?}): {e}"))?;
    if reply.code != REP_SUCCEEDED {
        return Err(format!(
            "CONNECT {target:?} via {proxy} ({auth:?}): reply code {:#04x}",
            reply.code
        ));
    }
    Ok(s)
}

// ---------------------------------------------------------------------------
// UDP ASSOCIATE datagrams (RFC 1928 section 7).
//
// ```text
// RSV(2)=0 FRAG(1) ATYP DST.ADDR DST.PORT DATA
// ```
// ---------------------------------------------------------------------------

/// A client-to-relay datagram for `target` carrying `data`.
pub fn udp_datagram(frag: u8, target: &Target, data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, frag];
    target.encode(&mut v);
    v.extend_from_slice(data);
    v
}

/// A parsed relay-to-client datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpDatagram {
    pub frag: u8,
    /// The target the payload came from.
    pub source: Target,
    pub data: Vec<u8>,
}

/// Parses a datagram the relay sent to the client.
pub fn parse_udp_datagram(b: &[u8]) -> Result<UdpDatagram, String> {
    let short = || format!("datagram too short: {b:02x?}");
    if b.len() < 4 {
        return Err(short());
    }
    if b[0] != 0 || b[1] != 0 {
        return Err(format!("RSV is not zero: {:02x?}", &b[..2]));
    }
    let frag = b[2];
    let (ip, rest): (IpAddr, &[u8]) = match b[3] {
        ATYP_IPV4 => {
            let a: [u8; 4] = b.get(4..8).ok_or_else(short)?.try_into().expect("4 bytes");
            (IpAddr::V4(Ipv4Addr::from(a)), &b[8..])
        }
        ATYP_IPV6 => {
            let a: [u8; 16] = b
                .get(4..20)
                .ok_or_else(short)?
                .try_into()
                .expect("16 bytes");
            (IpAddr::V6(Ipv6Addr::from(a)), &b[20..])
        }
        other => return Err(format!("relay datagram with ATYP {other}: {b:02x?}")),
    };
    let port = u16::from_be_bytes(
        rest.get(..2)
            .ok_or_else(short)?
            .try_into()
            .expect("2 bytes"),
    );
    Ok(UdpDatagram {
        frag,
        source: Target::Ip(SocketAddr::new(ip, port)),
        data: rest[2..].to_vec(),
    })
}
