//! The last-resort path: read into a userspace buffer, write it out.

use std::{
    io,
    os::fd::AsFd as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use proxy_common::metrics::{DataPath, Direction};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{
        tcp::{ReadHalf, WriteHalf},
        TcpStream,
    },
};

use super::{
    idle_watch,
    splice::{fit, SMALL_CHUNK},
    End, HalfCloses, Outcome,
};
use crate::{registry::ByteCounters, sys, Shared};

/// Buffer per direction; 64 KiB measured well ahead of 8 KiB on loopback.
const BUF: usize = 64 * 1024;

/// Copies both directions until both reach end of file, forwarding each half-close.
///
/// `bytes` receives the running totals (read by the session registry).
pub async fn relay(
    shared: &Shared,
    mut client: TcpStream,
    mut upstream: TcpStream,
    idle: Duration,
    bytes: &ByteCounters,
) -> Outcome {
    let _active = shared.metrics.relaying(DataPath::Copy);
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let (up, down) = (&bytes.up, &bytes.down);
    let closes = HalfCloses::default();
    let end = tokio::select! {
        res = async {
            tokio::try_join!(
                one_way(shared, &mut cr, &mut uw, Direction::Up, up, &closes),
                one_way(shared, &mut ur, &mut cw, Direction::Down, down, &closes),
            )
        } => match res {
            Ok(_) => End::Eof,
            Err(e) => End::Error(e),
        },
        () = idle_watch(idle, || up.load(Relaxed) + down.load(Relaxed)) => End::Idle,
    };
    if matches!(end, End::Error(_)) {
        abort(&client, &upstream);
    }
    Outcome {
        path: DataPath::Copy,
        up: up.load(Relaxed),
        down: down.load(Relaxed),
        end,
        promoted: false,
    }
}

/// Resets both sockets so that each peer learns the session failed.
pub fn abort(client: &TcpStream, upstream: &TcpStream) {
    let _ = sys::set_linger_zero(client.as_fd());
    let _ = sys::set_linger_zero(upstream.as_fd());
}

async fn one_way(
    shared: &Shared,
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    dir: Direction,
    total: &AtomicU64,
    closes: &HalfCloses,
) -> io::Result<()> {
    // The buffer is taken at the first payload (or end of file), so that an idle session holds
    // none.
    from.as_ref().readable().await?;
    let mut buf = vec![0u8; BUF];
    // The direction's sockets get bulk buffer sizes at its first large read.
    let mut fitted = false;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Forward the half-close; the other direction may go on.
            return closes.forward(to.as_ref().as_fd());
        }
        to.write_all(&buf[..n]).await?;
        total.fetch_add(n as u64, Relaxed);
        shared.metrics.add_traffic(DataPath::Copy, dir, n as u64);
        if !fitted && n >= SMALL_CHUNK {
            fitted = true;
            fit(shared, from.as_ref(), to.as_ref(), false);
        }
    }
}
