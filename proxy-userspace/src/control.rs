//! The control socket: a Unix stream socket (mode 0600, in a 0700 directory when the daemon
//! creates it) where `ebsocks sessions` and `ebsocks stats` ask the running daemon what only it
//! knows: the live sessions and a few facts about itself.
//!
//! Protocol: one JSON object per line each way. Requests are `{"cmd":"sessions"}` and
//! `{"cmd":"info"}`; every answer has `"ok"`, and either the data (`"sessions"`: an array of
//! [`SessionInfo`], `"info"`: an [`Info`]) or `"error"`. A connection may carry several
//! requests; the daemon closes it at end of file, after an oversized line, or after
//! [`IDLE`] without a request. Only root and the daemon's own user may connect (checked with
//! `SO_PEERCRED`, in addition to the file mode).

use std::{
    collections::BTreeMap,
    io::{self, BufRead as _, Write as _},
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{registry::SessionInfo, Shared};

/// Longest request line accepted.
pub const REQUEST_MAX: usize = 4096;
/// A connection without a request for this long is closed.
pub const IDLE: Duration = Duration::from_secs(30);
/// Bound for the CLI's exchange with the daemon.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Facts about the running daemon (`{"cmd":"info"}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Info {
    /// The daemon's process id.
    pub pid: u32,
    /// The daemon's version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_secs: f64,
    /// The data path chosen at start-up (`sockmap`, `splice` or `copy`).
    pub data_path: String,
    /// The pin directory.
    pub pin_dir: String,
    /// The SOCKS listeners.
    pub listen: Vec<SocketAddr>,
    /// The bound Prometheus endpoint, when enabled.
    pub metrics_listen: Option<SocketAddr>,
    /// Sessions in the registry now.
    pub sessions: usize,
    /// Sessions per state, from the registry.
    pub states: BTreeMap<String, usize>,
    /// Sessions and bytes per user and per rule, clients connected now.
    #[serde(default)]
    pub accounts: crate::registry::Accounts,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Sessions,
    Info,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Response {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sessions: Option<Vec<SessionInfo>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    info: Option<Info>,
}

/// The listening control socket; removes its file on drop (if it is still ours).
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    ino: u64,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.task.abort();
        // Another daemon may have replaced a socket it found dead; leave that one alone.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl ControlSocket {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Binds the control socket at `path` and serves it until the returned value drops.
///
/// Creates the parent directory (mode 0700) when missing. A socket file left by a dead daemon
/// is replaced; one that still answers is an error (`AddrInUse`), as is any other file there.
pub fn start(shared: Arc<Shared>, path: &Path) -> io::Result<ControlSocket> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is in use by another daemon (set control_socket)",
                        path.display()
                    ),
                ))
            }
            Err(_) => std::fs::remove_file(path)?,
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let ino = std::fs::symlink_metadata(path)?.ino();
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    let task = tokio::spawn(accept_loop(listener, shared));
    Ok(ControlSocket {
        path: path.to_owned(),
        ino,
        task,
    })
}

async fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(cause = %e, "control socket: accept failed");
                tokio::time::sleep(crate::session::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(c) if c.uid() == 0 || c.uid() == me => {}
            Ok(c) => {
                tracing::warn!(uid = c.uid(), pid = ?c.pid(), "control socket: connection from an unprivileged user refused");
                continue;
            }
            Err(e) => {
                tracing::warn!(cause = %e, "control socket: cannot read the peer's credentials");
                continue;
            }
        }
        tokio::spawn(serve_conn(stream, shared.clone()));
    }
}

async fn serve_conn(stream: UnixStream, shared: Arc<Shared>) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = tokio::time::timeout(IDLE, read_line(&mut r, &mut line)).await;
        let resp = match read {
            Err(_) | Ok(Ok(false)) | Ok(Err(_)) => return,
            Ok(Ok(true)) if line.len() > REQUEST_MAX => {
                let resp = Response {
                    error: Some(format!("request longer than {REQUEST_MAX} bytes")),
                    ..Default::default()
                };
                let _ = write_response(&mut w, &resp).await;
                return;
            }
            Ok(Ok(true)) => answer(&shared, &line),
        };
        if write_response(&mut w, &resp).await.is_err() {
            return;
        }
    }
}

/// Reads one line (without its newline) into `buf`, at most [`REQUEST_MAX`] + 1 bytes of it.
/// Returns false at end of file with nothing read.
async fn read_line(
    r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    buf: &mut Vec<u8>,
) -> io::Result<bool> {
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(!buf.is_empty());
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = (REQUEST_MAX + 1).saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..take.min(room)]);
        r.consume(take);
        if done || buf.len() > REQUEST_MAX {
            if buf.last() == Some(&b'\n') {
                buf.pop();
            }
            return Ok(true);
        }
    }
}

async fn write_response(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &Response,
) -> io::Result<()> {
    let mut out = serde_json::to_vec(resp).map_err(io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await
}

fn answer(shared: &Shared, line: &[u8]) -> Response {
    match serde_json::from_slice::<Request>(line) {
        Ok(Request::Sessions) => Response {
            ok: true,
            sessions: Some(shared.registry.list(shared)),
            ..Default::default()
        },
        Ok(Request::Info) => Response {
            ok: true,
            info: Some(shared.info()),
            ..Default::default()
        },
        Err(e) => Response {
            error: Some(format!(
                "bad request ({e}); expected {{\"cmd\":\"sessions\"}} or {{\"cmd\":\"info\"}}"
            )),
            ..Default::default()
        },
    }
}

/// Why the CLI could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting or talking to the socket failed.
    #[error(
        "cannot query the daemon at {path}: {source}{}",
        crate::reach_hint(source, "its control socket", "control socket")
    )]
    Io {
        /// The socket.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The daemon answered with an error or something unreadable.
    #[error("the daemon at {path} answered: {message}")]
    Daemon {
        /// The socket.
        path: String,
        /// What it said.
        message: String,
    },
}

fn request(path: &Path, cmd: &str) -> Result<Response, ClientError> {
    let io_err = |source| ClientError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(io_err)?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io_err)?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io_err)?;
    s.write_all(format!("{{\"cmd\":\"{cmd}\"}}\n").as_bytes())
        .map_err(io_err)?;
    let mut line = String::new();
    io::BufReader::new(&s)
        .read_line(&mut line)
        .map_err(io_err)?;
    let daemon_err = |message: String| ClientError::Daemon {
        path: path.display().to_string(),
        message,
    };
    let resp: Response = serde_json::from_str(&line)
        .map_err(|e| daemon_err(format!("unreadable answer ({e}): {line:?}")))?;
    if !resp.ok {
        return Err(daemon_err(resp.error.unwrap_or_else(|| "error".to_owned())));
    }
    Ok(resp)
}

/// Asks the daemon at `path` for its live sessions.
pub fn sessions(path: &Path) -> Result<Vec<SessionInfo>, ClientError> {
    let resp = request(path, "sessions")?;
    resp.sessions.ok_or_else(|| ClientError::Daemon {
        path: path.display().to_string(),
        message: "no sessions in the answer".into(),
    })
}

/// Asks the daemon at `path` about itself.
pub fn info(path: &Path) -> Result<Info, ClientError> {
    let resp = request(path, "info")?;
    resp.info.ok_or_else(|| ClientError::Daemon {
        path: path.display().to_string(),
        message: "no info in the answer".into(),
    })
}
