//! RFC 1929 username/password authentication: the users file, Argon2id verification with a
//! short-lived success cache, and a per-address slow-down of repeated failures.
//!
//! The users file holds one `username:PHC-hash` per line, written with `ebsocks hash-password`
//! ([`hash_password`]). Plain-text passwords are refused at load time, so the file never becomes
//! a password list by accident.
//!
//! # Cost
//!
//! [`hash_password`] uses Argon2id, version 0x13, m = 19 MiB (19,456 KiB), t = 2, p = 1: the
//! first of OWASP's equivalent Argon2id settings, and the `argon2` crate's default. One
//! verification took 22–23 ms (minimum and median of 30, release build) on the 2-core reference
//! machine while it was also compiling, and allocates 19 MiB. At most one verification per CPU
//! runs at a time, so a flood of logins costs queueing time, not memory. (Unoptimised test
//! builds are about ten times slower, so the unit tests hash at the minimum cost.)
//!
//! Everything here is synchronous and CPU-bound: the daemon calls [`UserDb::verify`] from
//! `tokio::task::spawn_blocking`.

use std::{
    collections::HashMap,
    fmt, io,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroUsize,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Condvar, Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, Instant},
};

use argon2::{
    password_hash::{phc::PasswordHash, PasswordHasher, PasswordVerifier},
    Algorithm, Argon2, Params, Version,
};
use blake2::{
    digest::{consts::U32, Mac},
    Blake2bMac,
};

/// How long a successful verification is remembered, so that a client opening many sessions
/// with the same credentials pays for one Argon2 run, not one per session.
pub const CACHE_TTL: Duration = Duration::from_secs(5 * 60);

/// At most this many cached successes; a bound so that the cache cannot grow without limit.
const CACHE_CAP: usize = 4096;

/// Argon2id memory cost of [`hash_password`], in KiB (19 MiB).
const M_COST_KIB: u32 = 19 * 1024;
/// Argon2id passes of [`hash_password`].
const T_COST: u32 = 2;
/// Argon2id lanes of [`hash_password`].
const P_COST: u32 = 1;

/// Hashes in the users file may not ask for more than this (1 GiB, 64 passes, 64 lanes): a
/// typo or a hostile file must not turn every login into a memory or CPU exhaustion.
const MAX_M_COST_KIB: u32 = 1024 * 1024;
const MAX_T_COST: u32 = 64;
const MAX_P_COST: u32 = 64;

/// RFC 1929 carries the username in a one-byte length field, so longer names could never log in.
pub const MAX_USERNAME_LEN: usize = 255;

/// Verified against when the database has no users, so that a failed login costs the same
/// whatever the file holds. The password behind it is random and was thrown away.
const EMPTY_DB_DUMMY: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$2mxY1PL6cU6mngdX0SYrGg$z97eqHRrF552lAHCwoLwrCdAMU5DwzesLiJ2kTMCEqk";

/// Why the users file could not be loaded. Messages name the file and line, never a password
/// or hash.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read.
    #[error("cannot read users file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A line is not `username:argon2-PHC-hash`.
    #[error("{origin}:{line}: {problem}")]
    Line {
        /// The file name (or another description of where the text came from).
        origin: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },
}

/// The users allowed to log in with RFC 1929 username/password authentication.
///
/// `Send + Sync`: the success cache sits behind a mutex, so one database serves every session.
pub struct UserDb {
    users: HashMap<Box<[u8]>, PasswordHash>,
    /// Verified against for unknown users, so that they cost as much as known ones.
    dummy: PasswordHash,
    /// Random per database: the cache holds keyed digests, never a password.
    cache_key: [u8; 32],
    cache: Mutex<HashMap<[u8; 32], Instant>>,
    gate: Gate,
    /// Argon2 runs so far (lets tests tell a cache hit from a miss).
    hashes: AtomicU64,
}

impl fmt::Debug for UserDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hashes stay out of logs.
        f.debug_struct("UserDb")
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

impl UserDb {
    /// Reads and validates a users file (see [`UserDb::from_str`] for the format).
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_str(&text, &path.display().to_string())
    }

    /// Parses users-file text: one `username:PHC-hash` per line, `#` comments and blank lines
    /// allowed, hashes made by [`hash_password`] (any Argon2 variant is accepted). Plain-text
    /// passwords, other schemes, duplicate users and excessive cost parameters are refused with
    /// an error naming `origin` and the line.
    ///
    /// # Panics
    ///
    /// If the OS random number generator fails (it keys the success cache).
    pub fn from_str(text: &str, origin: &str) -> Result<Self, AuthError> {
        let mut users: HashMap<Box<[u8]>, PasswordHash> = HashMap::new();
        let mut first: Option<PasswordHash> = None;
        for (i, raw_line) in text.lines().enumerate() {
            let err = |problem: String| AuthError::Line {
                origin: origin.to_owned(),
                line: i + 1,
                problem,
            };
            let line = raw_line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(err("expected `username:hash`".to_owned()));
            };
            if user.is_empty() {
                return Err(err("empty username".to_owned()));
            }
            if user.len() > MAX_USERNAME_LEN {
                return Err(err(format!(
                    "username longer than {MAX_USERNAME_LEN} bytes (the RFC 1929 limit)"
                )));
            }
            let hash = parse_hash(hash.trim()).map_err(err)?;
            if users.contains_key(user.as_bytes()) {
                return Err(err(format!("user {user:?} is listed twice")));
            }
            first.get_or_insert_with(|| hash.clone());
            users.insert(user.as_bytes().into(), hash);
        }
        // Unknown users are checked against the first user's hash, whose cost matches the others
        // (all made by the same `hash-password`); the result is discarded.
        let dummy = match first {
            Some(h) => h,
            None => PasswordHash::new(EMPTY_DB_DUMMY)
                .unwrap_or_else(|e| unreachable!("embedded dummy hash: {e}")),
        };
        let mut cache_key = [0u8; 32];
        if let Err(e) = getrandom::fill(&mut cache_key) {
            // Without the OS RNG the cache key would be guessable; no sane Linux gets here.
            panic!("the OS random number generator failed: {e}");
        }
        Ok(Self {
            users,
            dummy,
            cache_key,
            cache: Mutex::new(HashMap::new()),
            gate: Gate::new(std::thread::available_parallelism().map_or(2, NonZeroUsize::get)),
            hashes: AtomicU64::new(0),
        })
    }

    /// Number of users, so that the daemon can warn about an empty file.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether `user` is listed.
    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user.as_bytes())
    }

    /// Whether the file lists no user (every login will fail).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Checks RFC 1929 credentials. An unknown user costs one Argon2 run, like a known one, so
    /// timing does not tell which usernames exist. Successes are cached for [`CACHE_TTL`] under a
    /// keyed digest of user and password, so a client opening many sessions pays once.
    ///
    /// CPU-heavy (tens of milliseconds) and may wait for a free slot: call it from
    /// `spawn_blocking`.
    pub fn verify(&self, user: &[u8], password: &[u8]) -> bool {
        self.verify_at(user, password, Instant::now())
    }

    fn verify_at(&self, user: &[u8], password: &[u8], now: Instant) -> bool {
        let key = self.cache_digest(user, password);
        if let Some(&at) = lock(&self.cache).get(&key) {
            if now.saturating_duration_since(at) < CACHE_TTL {
                return true;
            }
        }
        let (known, hash) = match self.users.get(user) {
            Some(h) => (true, h),
            None => (false, &self.dummy),
        };
        let ok = {
            let _slot = self.gate.enter();
            self.hashes.fetch_add(1, Ordering::Relaxed);
            Argon2::default().verify_password(password, hash).is_ok()
        };
        let ok = known && ok;
        if ok {
            let mut cache = lock(&self.cache);
            if cache.len() >= CACHE_CAP && !cache.contains_key(&key) {
                cache.retain(|_, at| now.saturating_duration_since(*at) < CACHE_TTL);
                if cache.len() >= CACHE_CAP {
                    if let Some(oldest) = cache.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k) {
                        cache.remove(&oldest);
                    }
                }
            }
            cache.insert(key, now);
        }
        ok
    }

    /// Keyed BLAKE2b-256 of (length of user, user, password): what the cache stores instead of
    /// the password. The length prefix keeps `ab`+`c` apart from `a`+`bc`.
    fn cache_digest(&self, user: &[u8], password: &[u8]) -> [u8; 32] {
        let mut mac = Blake2bMac::<U32>::new_with_salt_and_personal(
            Some(&self.cache_key),
            b"",
            b"ebsocks-auth",
        )
        .unwrap_or_else(|e| unreachable!("32-byte key, 12-byte persona: {e}"));
        mac.update(&(user.len() as u64).to_le_bytes());
        mac.update(user);
        mac.update(password);
        mac.finalize().into_bytes().into()
    }
}

/// Checks one hash field of the users file. The message never quotes the field: it may be a
/// plain-text password.
fn parse_hash(field: &str) -> Result<PasswordHash, String> {
    const HOW: &str = "make one with `ebsocks hash-password`";
    if !field.starts_with('$') {
        return Err(format!(
            "the password is not a hash (plain-text passwords are refused; {HOW})"
        ));
    }
    // Not quoted either: a plain-text password may well start with `$`.
    let scheme = field[1..].split('$').next().unwrap_or_default();
    if Algorithm::try_from(scheme).is_err() {
        return Err(format!(
            "unsupported hash scheme (only Argon2, `$argon2id$...`, is supported; {HOW})"
        ));
    }
    let hash = PasswordHash::new(field)
        .map_err(|e| format!("the password is not a valid PHC hash string ({e}); {HOW}"))?;
    if let Some(v) = hash.version {
        Version::try_from(v).map_err(|_| format!("unsupported Argon2 version {v}"))?;
    }
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err(format!("the hash has no salt or no output; {HOW}"));
    }
    let params = Params::try_from(&hash).map_err(|e| format!("bad Argon2 parameters ({e})"))?;
    if params.m_cost() > MAX_M_COST_KIB
        || params.t_cost() > MAX_T_COST
        || params.p_cost() > MAX_P_COST
    {
        return Err(format!(
            "Argon2 cost too high (m={} KiB, t={}, p={}; limits are m={MAX_M_COST_KIB}, t={MAX_T_COST}, p={MAX_P_COST})",
            params.m_cost(),
            params.t_cost(),
            params.p_cost()
        ));
    }
    Ok(hash)
}

/// Hashes a password for the users file, as a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`)
/// with a fresh random salt. Used by `ebsocks hash-password`.
///
/// # Panics
///
/// If the OS random number generator fails.
pub fn hash_password(password: &str) -> String {
    let params = Params::new(M_COST_KIB, T_COST, P_COST, None)
        .unwrap_or_else(|e| unreachable!("constant Argon2 parameters: {e}"));
    hash_with(password.as_bytes(), params)
}

fn hash_with(password: &[u8], params: Params) -> String {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password)
        .unwrap_or_else(|e| panic!("cannot hash the password: {e}"))
        .to_string()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent even if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counting semaphore for blocking threads: caps concurrent Argon2 runs, and so their memory.
struct Gate {
    busy: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

struct GateSlot<'a>(&'a Gate);

impl Gate {
    fn new(max: usize) -> Self {
        Self {
            busy: Mutex::new(0),
            freed: Condvar::new(),
            max: max.max(1),
        }
    }

    fn enter(&self) -> GateSlot<'_> {
        let mut busy = lock(&self.busy);
        while *busy >= self.max {
            busy = self
                .freed
                .wait(busy)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *busy += 1;
        GateSlot(self)
    }
}

impl Drop for GateSlot<'_> {
    fn drop(&mut self) {
        *lock(&self.0.busy) -= 1;
        self.0.freed.notify_one();
    }
}

/// First wait after a failure; it doubles with each further failure.
pub const FAILURE_BASE_DELAY: Duration = Duration::from_millis(250);
/// The wait never grows beyond this, so a user who mistyped a few times is not locked out.
pub const FAILURE_MAX_DELAY: Duration = Duration::from_secs(10);
/// An address with no failure for this long starts again from zero.
pub const FAILURE_IDLE_EXPIRY: Duration = Duration::from_secs(15 * 60);
/// Addresses tracked at most; bounds memory against clients spread over many addresses.
pub const FAILURE_TABLE_CAP: usize = 65_536;

/// Slows down password guessing per source: after the n-th consecutive failure from an address,
/// the next attempt from it must wait `min(250 ms × 2^(n-1), 10 s)`, counted from that failure.
/// A success resets the count; an entry expires after 15 minutes without failures.
///
/// IPv4 addresses are tracked one by one (IPv4-mapped IPv6 counts as IPv4). IPv6 addresses are
/// tracked per /64, because one host usually owns a whole /64 and could otherwise step around
/// the delay, and flush the table, by changing its interface identifier.
///
/// Memory is bounded by [`FAILURE_TABLE_CAP`] entries: when full, expired entries go first,
/// then the oldest sixteenth.
#[derive(Debug)]
pub struct FailureTracker {
    table: Mutex<HashMap<IpAddr, Failures>>,
    cap: usize,
}

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    last: Instant,
}

impl Default for FailureTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl FailureTracker {
    /// An empty tracker holding at most [`FAILURE_TABLE_CAP`] addresses.
    pub fn new() -> Self {
        Self::with_capacity(FAILURE_TABLE_CAP)
    }

    fn with_capacity(cap: usize) -> Self {
        Self {
            table: Mutex::new(HashMap::new()),
            cap: cap.max(1),
        }
    }

    /// How long an authentication attempt from `ip` must still wait at `now`: the backoff of its
    /// last failure minus the time since then (zero for an address with no recent failure).
    pub fn delay(&self, ip: IpAddr, now: Instant) -> Duration {
        let table = lock(&self.table);
        let Some(f) = table.get(&source_key(ip)) else {
            return Duration::ZERO;
        };
        if now.saturating_duration_since(f.last) >= FAILURE_IDLE_EXPIRY {
            return Duration::ZERO;
        }
        (f.last + backoff(f.count)).saturating_duration_since(now)
    }

    /// Records a failed authentication from `ip` at `now`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let key = source_key(ip);
        let mut table = lock(&self.table);
        if !table.contains_key(&key) && table.len() >= self.cap {
            evict(&mut table, self.cap, now);
        }
        let f = table.entry(key).or_insert(Failures {
            count: 0,
            last: now,
        });
        if now.saturating_duration_since(f.last) >= FAILURE_IDLE_EXPIRY {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
    }

    /// Records a successful authentication from `ip`: its next attempt waits for nothing.
    pub fn succeeded(&self, ip: IpAddr) {
        lock(&self.table).remove(&source_key(ip));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.table).len()
    }
}

/// The wait after `count` consecutive failures.
fn backoff(count: u32) -> Duration {
    match count {
        0 => Duration::ZERO,
        n => FAILURE_BASE_DELAY
            .saturating_mul(1 << (n - 1).min(16))
            .min(FAILURE_MAX_DELAY),
    }
}

/// IPv4 as is, IPv6 truncated to its /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(a) => IpAddr::V4(a),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & !(u128::from(u64::MAX)))),
    }
}

/// Makes room in a full table: drop expired entries, and if that is not enough, the oldest
/// sixteenth (so that a flood of new addresses pays this O(n) pass once per cap/16 insertions).
fn evict(table: &mut HashMap<IpAddr, Failures>, cap: usize, now: Instant) {
    table.retain(|_, f| now.saturating_duration_since(f.last) < FAILURE_IDLE_EXPIRY);
    if table.len() < cap {
        return;
    }
    let mut times: Vec<Instant> = table.values().map(|f| f.last).collect();
    let n = (cap / 16).clamp(1, times.len());
    let (_, &mut threshold, _) = times.select_nth_unstable(n - 1);
    table.retain(|_, f| f.last > threshold);
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// Argon2 at its minimum cost: unoptimised test builds would take seconds per hash otherwise.
    fn cheap(password: &str) -> String {
        hash_with(
            password.as_bytes(),
            Params::new(Params::MIN_M_COST, 1, 1, None).unwrap(),
        )
    }

    fn db(lines: &[(&str, &str)]) -> UserDb {
        let text: String = lines
            .iter()
            .map(|(u, p)| format!("{u}:{}\n", cheap(p)))
            .collect();
        UserDb::from_str(&text, "users.txt").unwrap()
    }

    #[test]
    fn hash_password_then_verify() {
        let h = hash_password("correct horse");
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        let db = UserDb::from_str(&format!("# the admin\n\nalice:{h}\n"), "users.txt").unwrap();
        assert_eq!(db.len(), 1);
        assert!(db.verify(b"alice", b"correct horse"));
        // Fresh salt every time.
        assert_ne!(hash_password("correct horse"), h);
    }

    #[test]
    fn wrong_password_and_unknown_user_fail_at_the_same_cost() {
        let db = db(&[("alice", "pw-a"), ("bob", "pw-b")]);
        assert!(!db.verify(b"alice", b"pw-b"));
        assert!(!db.verify(b"alice", b""));
        assert_eq!(db.hashes.load(Ordering::Relaxed), 2);
        // Unknown user: one hash run, and alice's password does not open a made-up name.
        assert!(!db.verify(b"mallory", b"pw-a"));
        assert_eq!(db.hashes.load(Ordering::Relaxed), 3);
        assert!(db.verify(b"bob", b"pw-b"));
        // Usernames are exact bytes.
        assert!(!db.verify(b"Bob", b"pw-b"));
    }

    #[test]
    fn empty_db_rejects_everyone() {
        let db = UserDb::from_str("# nobody yet\n", "users.txt").unwrap();
        assert!(db.is_empty());
        // The embedded dummy must parse, or this would have panicked above.
        assert_eq!(db.dummy.algorithm.as_str(), "argon2id");
    }

    #[test]
    fn successes_are_cached_until_the_ttl() {
        let db = db(&[("alice", "pw-a")]);
        let t0 = Instant::now();
        assert!(db.verify_at(b"alice", b"pw-a", t0));
        assert_eq!(db.hashes.load(Ordering::Relaxed), 1);
        assert!(db.verify_at(b"alice", b"pw-a", t0 + Duration::from_secs(60)));
        assert_eq!(
            db.hashes.load(Ordering::Relaxed),
            1,
            "second login is a cache hit"
        );
        // A wrong password is not served from the cache.
        assert!(!db.verify_at(b"alice", b"pw-b", t0));
        assert_eq!(db.hashes.load(Ordering::Relaxed), 2);
        // After the TTL the hash runs again.
        assert!(db.verify_at(b"alice", b"pw-a", t0 + CACHE_TTL));
        assert_eq!(db.hashes.load(Ordering::Relaxed), 3);
        // The cache holds digests, not credentials, and they separate user from password.
        assert_ne!(db.cache_digest(b"ab", b"c"), db.cache_digest(b"a", b"bc"));
    }

    #[test]
    fn plain_text_is_refused_with_its_line_and_without_echo() {
        let text = format!("# users\nalice:{}\nbob:hunter2\n", cheap("x"));
        let err = UserDb::from_str(&text, "/etc/ebsocks/users")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/ebsocks/users:3: "), "{err}");
        assert!(err.contains("plain-text"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn bad_lines_are_refused() {
        let good = cheap("x");
        let cases = [
            ("alice".to_owned(), "expected `username:hash`"),
            (format!(":{good}"), "empty username"),
            (format!("{}:{good}", "u".repeat(256)), "255"),
            (
                "alice:$2b$12$abcdefghijklmnopqrstuv".to_owned(),
                "unsupported hash scheme",
            ),
            (
                "alice:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ".to_owned(),
                "no salt or no output",
            ),
            (
                "alice:$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
                    .to_owned(),
                "cost too high",
            ),
            (format!("alice:{good}\nalice:{good}"), "listed twice"),
        ];
        for (text, want) in cases {
            let err = UserDb::from_str(&text, "u").unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn load_names_the_file() {
        let err = UserDb::load(Path::new("/nonexistent/ebsocks-users")).unwrap_err();
        assert!(matches!(err, AuthError::Read { .. }));
        assert!(
            err.to_string().contains("/nonexistent/ebsocks-users"),
            "{err}"
        );
    }

    #[test]
    fn shared_across_threads() {
        fn check<T: Send + Sync>() {}
        check::<UserDb>();
        check::<FailureTracker>();
        let db = std::sync::Arc::new(db(&[("alice", "pw-a")]));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let db = db.clone();
                std::thread::spawn(move || {
                    db.verify(b"alice", if i % 2 == 0 { b"pw-a" } else { b"nope" })
                })
            })
            .collect();
        let results: Vec<bool> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(results, [true, false, true, false]);
    }

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn backoff_doubles_then_caps() {
        let t = FailureTracker::new();
        let now = Instant::now();
        assert_eq!(t.delay(A, now), Duration::ZERO);
        let expected_ms = [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000];
        for ms in expected_ms {
            t.failed(A, now);
            assert_eq!(t.delay(A, now), Duration::from_millis(ms));
        }
        // Other addresses are not affected.
        assert_eq!(t.delay(B, now), Duration::ZERO);
        // Hundreds of failures neither overflow nor exceed the cap.
        for _ in 0..300 {
            t.failed(A, now);
        }
        assert_eq!(t.delay(A, now), FAILURE_MAX_DELAY);
    }

    #[test]
    fn delay_counts_from_the_failure() {
        let t = FailureTracker::new();
        let now = Instant::now();
        t.failed(A, now);
        t.failed(A, now);
        assert_eq!(
            t.delay(A, now + Duration::from_millis(200)),
            Duration::from_millis(300)
        );
        assert_eq!(t.delay(A, now + Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn success_resets() {
        let t = FailureTracker::new();
        let now = Instant::now();
        t.failed(A, now);
        t.failed(A, now);
        t.succeeded(A);
        assert_eq!(t.delay(A, now), Duration::ZERO);
        t.failed(A, now);
        assert_eq!(t.delay(A, now), FAILURE_BASE_DELAY);
    }

    #[test]
    fn entries_expire_after_idle_time() {
        let t = FailureTracker::new();
        let now = Instant::now();
        for _ in 0..5 {
            t.failed(A, now);
        }
        let later = now + FAILURE_IDLE_EXPIRY;
        assert_eq!(t.delay(A, later), Duration::ZERO);
        // The count starts again from one.
        t.failed(A, later);
        assert_eq!(t.delay(A, later), FAILURE_BASE_DELAY);
    }

    #[test]
    fn mapped_ipv4_and_ipv6_prefixes_share_an_entry() {
        let t = FailureTracker::new();
        let now = Instant::now();
        t.failed("::ffff:192.0.2.1".parse().unwrap(), now);
        assert_eq!(t.delay(A, now), FAILURE_BASE_DELAY);
        t.failed("2001:db8:1:2::1".parse().unwrap(), now);
        assert_eq!(
            t.delay("2001:db8:1:2:aaaa::9".parse().unwrap(), now),
            FAILURE_BASE_DELAY
        );
        assert_eq!(
            t.delay("2001:db8:1:3::1".parse().unwrap(), now),
            Duration::ZERO
        );
    }

    #[test]
    fn table_is_bounded_and_evicts_the_oldest() {
        let t = FailureTracker::with_capacity(64);
        let start = Instant::now();
        for i in 0..64u32 {
            t.failed(
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
                start + Duration::from_millis(u64::from(i)),
            );
        }
        assert_eq!(t.len(), 64);
        let newest = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + 63));
        let now = start + Duration::from_secs(1);
        t.failed(B, now);
        assert!(t.len() <= 64);
        assert_eq!(
            t.delay(IpAddr::V4(Ipv4Addr::from(0x0a00_0000)), now),
            Duration::ZERO,
            "oldest evicted"
        );
        assert!(
            t.delay(newest, start + Duration::from_millis(63)) > Duration::ZERO,
            "newest kept"
        );
        assert_eq!(t.delay(B, now), FAILURE_BASE_DELAY);
        // Expired entries make room first.
        let much_later = now + FAILURE_IDLE_EXPIRY;
        for i in 0..64u32 {
            t.failed(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)), much_later);
        }
        assert!(t.len() <= 64);
    }
}
