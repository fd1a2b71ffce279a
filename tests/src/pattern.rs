//! Deterministic payloads and the transfers that check them.
//!
//! A payload is the byte stream of a xorshift64 generator seeded through
//! splitmix64, in 64 KiB blocks of native-endian words. Both ends of every
//! transfer live in the test process, so the receiver regenerates the stream
//! from the seed and compares; an error names the first differing offset,
//! which says more than a digest mismatch would.

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

const BLOCK_WORDS: usize = 8 * 1024;
const BLOCK_BYTES: usize = BLOCK_WORDS * 8;
/// Read and write size of the transfer helpers.
pub const IO_CHUNK: usize = 256 * 1024;

/// An endless pseudo-random byte stream identified by its seed.
pub struct Pattern {
    state: u64,
    block: Box<[u64]>,
    /// Bytes of `block` already handed out.
    off: usize,
}

impl Pattern {
    /// The stream for `seed`; distinct seeds give unrelated streams.
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self {
            // xorshift must not start from 0.
            state: if z == 0 { 0x2545_F491_4F6C_DD1D } else { z },
            block: vec![0; BLOCK_WORDS].into_boxed_slice(),
            off: BLOCK_BYTES,
        }
    }

    /// The first `len` bytes of the stream for `seed`.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        Self::new(seed).fill(&mut v);
        v
    }

    fn refill(&mut self) {
        let mut s = self.state;
        for w in self.block.iter_mut() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *w = s;
        }
        self.state = s;
        self.off = 0;
    }

    fn block_bytes(&self) -> &[u8] {
        // SAFETY: u8 has alignment 1, every bit pattern is a valid u8, and the
        // length is exactly the memory of the words.
        unsafe {
            std::slice::from_raw_parts(
                self.block.as_ptr().cast::<u8>(),
                std::mem::size_of_val(&*self.block),
            )
        }
    }

    /// Writes the next `out.len()` bytes of the stream into `out`.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            if self.off == BLOCK_BYTES {
                self.refill();
            }
            let n = (out.len() - done).min(BLOCK_BYTES - self.off);
            out[done..done + n].copy_from_slice(&self.block_bytes()[self.off..self.off + n]);
            self.off += n;
            done += n;
        }
    }

    /// Compares `got` with the next bytes of the stream; on a difference
    /// returns the index in `got` of the first differing byte.
    pub fn check(&mut self, got: &[u8]) -> Result<(), usize> {
        let mut done = 0;
        while done < got.len() {
            if self.off == BLOCK_BYTES {
                self.refill();
            }
            let n = (got.len() - done).min(BLOCK_BYTES - self.off);
            let want = &self.block_bytes()[self.off..self.off + n];
            let have = &got[done..done + n];
            if want != have {
                let i = want.iter().zip(have).position(|(a, b)| a != b).unwrap_or(0);
                return Err(done + i);
            }
            self.off += n;
            done += n;
        }
        Ok(())
    }
}

/// Explains a mismatch: `got` (at least a few bytes) arrived at stream
/// offset `offset`; if they occur elsewhere in the stream up to 64 MiB past
/// `offset`, the data was repeated or skipped, which says more than "differs".
pub fn describe_mismatch(seed: u64, offset: u64, got: &[u8]) -> String {
    let search = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .saturating_add(64 << 20)
        .min(1 << 30);
    const SEARCH_MIN: usize = 8 << 20;
    let search = search.max(SEARCH_MIN);
    let needle = &got[..got.len().min(32)];
    let mut msg = format!("payload differs at offset {offset}");
    if needle.len() < 8 {
        return msg;
    }
    if needle.starts_with(&[5, 1, 0, 5]) {
        msg += "; they look like a SOCKS5 greeting and request, i.e. the client's negotiation bytes reached the target";
    }
    let hay = Pattern::bytes(seed, search);
    match hay.windows(needle.len()).position(|w| w == needle) {
        Some(at) if (at as u64) < offset => {
            msg += &format!(
                "; the bytes there repeat the stream from offset {at} ({} bytes back)",
                offset - at as u64
            )
        }
        Some(at) => {
            msg += &format!(
                "; the bytes there are the stream's from offset {at} ({} bytes skipped)",
                at as u64 - offset
            )
        }
        None => {
            msg += &format!(
            "; the bytes there ({needle:02x?}) are not from the first {search} bytes of the stream"
        )
        }
    }
    msg
}

/// Writes `len` bytes of the stream for `seed` (no shutdown).
pub async fn send_pattern<W: AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    len: u64,
) -> Result<(), String> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; IO_CHUNK];
    let mut sent = 0u64;
    while sent < len {
        let n = (len - sent).min(IO_CHUNK as u64) as usize;
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n])
            .await
            .map_err(|e| format!("write failed after {sent} of {len} bytes: {e}"))?;
        sent += n as u64;
    }
    Ok(())
}

/// Reads exactly `len` bytes and checks them against the stream for `seed`;
/// EOF before that is an error.
pub async fn recv_exact<R: AsyncRead + Unpin>(
    r: &mut R,
    seed: u64,
    len: u64,
) -> Result<(), String> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; IO_CHUNK];
    let mut got = 0u64;
    while got < len {
        let want = (len - got).min(IO_CHUNK as u64) as usize;
        let n = r
            .read(&mut buf[..want])
            .await
            .map_err(|e| format!("read failed after {got} of {len} bytes: {e}"))?;
        if n == 0 {
            return Err(format!("EOF after {got} of {len} bytes"));
        }
        p.check(&buf[..n]).map_err(|i| {
            format!(
                "{} (expecting {len} bytes)",
                describe_mismatch(seed, got + i as u64, &buf[i..n])
            )
        })?;
        got += n as u64;
    }
    Ok(())
}

/// Reads until EOF, checking the bytes against the stream for `seed`; exactly
/// `len` bytes must arrive. Returns `len`.
pub async fn recv_to_eof<R: AsyncRead + Unpin>(
    r: &mut R,
    seed: u64,
    len: u64,
) -> Result<u64, String> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; IO_CHUNK];
    let mut got = 0u64;
    loop {
        let n = r
            .read(&mut buf)
            .await
            .map_err(|e| format!("read failed after {got} of {len} bytes (before EOF): {e}"))?;
        if n == 0 {
            break;
        }
        if got + n as u64 > len {
            let fit = (len - got) as usize;
            p.check(&buf[..fit]).map_err(|i| {
                format!(
                    "{} (expecting {len} bytes)",
                    describe_mismatch(seed, got + i as u64, &buf[i..fit])
                )
            })?;
            let extra = &buf[fit..n];
            return Err(format!(
                "received more than the {len} bytes expected: {} more before EOF so far, starting with {:02x?}",
                extra.len(),
                &extra[..extra.len().min(32)]
            ));
        }
        p.check(&buf[..n]).map_err(|i| {
            format!(
                "{} (expecting {len} bytes)",
                describe_mismatch(seed, got + i as u64, &buf[i..n])
            )
        })?;
        got += n as u64;
    }
    if got != len {
        return Err(format!("EOF after {got} of {len} bytes"));
    }
    Ok(got)
}

/// Writes `send` = (seed, len) while reading exactly `recv` = (seed, len), on
/// one connection left open afterwards.
pub async fn send_and_recv(
    stream: &mut TcpStream,
    send: (u64, u64),
    recv: (u64, u64),
) -> Result<(), String> {
    let (mut r, mut w) = stream.split();
    tokio::try_join!(
        async {
            send_pattern(&mut w, send.0, send.1)
                .await
                .map_err(|e| format!("send: {e}"))
        },
        async {
            recv_exact(&mut r, recv.0, recv.1)
                .await
                .map_err(|e| format!("receive: {e}"))
        },
    )?;
    Ok(())
}

/// What one end of a connection does in [`exchange`].
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// (seed, len) to write and then `shutdown(SHUT_WR)`; `None` writes
    /// nothing and shuts down only after reading EOF, the way a server ends a
    /// request it has fully read.
    pub send: Option<(u64, u64)>,
    /// (seed, len) that must arrive, followed by EOF.
    pub recv: (u64, u64),
}

impl Plan {
    /// Receive `len` bytes of `seed` then EOF, then shut down.
    pub fn sink(seed: u64, len: u64) -> Self {
        Self {
            send: None,
            recv: (seed, len),
        }
    }

    /// Send `len` bytes of `seed` and shut down; expect nothing but EOF.
    pub fn source(seed: u64, len: u64) -> Self {
        Self {
            send: Some((seed, len)),
            recv: (0, 0),
        }
    }

    /// Shut down at once, then expect EOF: closes a connection cleanly.
    pub fn close() -> Self {
        Self::source(0, 0)
    }
}

/// Runs `plan` on `stream` and returns the number of bytes received (always
/// `plan.recv.1` on success).
pub async fn exchange(stream: &mut TcpStream, plan: Plan) -> Result<u64, String> {
    let (mut r, mut w) = stream.split();
    let (rseed, rlen) = plan.recv;
    match plan.send {
        Some((seed, len)) => {
            let send = async {
                send_pattern(&mut w, seed, len)
                    .await
                    .map_err(|e| format!("send: {e}"))?;
                w.shutdown()
                    .await
                    .map_err(|e| format!("shutdown after send: {e}"))
            };
            let recv = async {
                recv_to_eof(&mut r, rseed, rlen)
                    .await
                    .map_err(|e| format!("receive: {e}"))
            };
            let ((), n) = tokio::try_join!(send, recv)?;
            Ok(n)
        }
        None => {
            let n = recv_to_eof(&mut r, rseed, rlen)
                .await
                .map_err(|e| format!("receive: {e}"))?;
            w.shutdown()
                .await
                .map_err(|e| format!("shutdown after EOF: {e}"))?;
            Ok(n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Pattern;

    #[test]
    fn fill_and_check_agree_across_blocks() {
        let whole = Pattern::bytes(7, 200_000);
        let mut p = Pattern::new(7);
        for chunk in whole.chunks(12_345) {
            assert_eq!(p.check(chunk), Ok(()));
        }
        let mut p = Pattern::new(7);
        let mut bad = whole[..70_000].to_vec();
        bad[66_000] ^= 1;
        assert_eq!(p.check(&bad), Err(66_000));
        assert_ne!(Pattern::bytes(1, 64), Pattern::bytes(2, 64));
    }
}
