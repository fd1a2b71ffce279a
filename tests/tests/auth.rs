//! RFC 1929 username/password authentication, and the per-client-rule method restriction.

use std::{net::SocketAddr, sync::OnceLock, time::Duration};

use proxy_integration::{
    checks::wait_counter,
    exchange, require_privileged, skip_or_panic,
    socks::{self, Auth},
    wait_closed, within, Daemon, DaemonOpts, Echo, Plan, UsersFile,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

const LIMIT: Duration = Duration::from_secs(20);
const PROMPT: Duration = Duration::from_secs(3);
const ALICE_PW: &str = "correct horse battery staple";

/// One users file for the whole binary: hashing costs ~25 ms per user in release.
fn users() -> &'static UsersFile {
    static U: OnceLock<UsersFile> = OnceLock::new();
    U.get_or_init(|| {
        UsersFile::kept(
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("auth-users"),
            &[("alice", ALICE_PW), ("bob", "bob's secret")],
        )
    })
}

/// Echoes 64 KiB through `s`.
async fn echo(s: &mut TcpStream, seed: u64, what: &str) {
    within(
        LIMIT,
        what,
        exchange(
            s,
            Plan {
                send: Some((seed, 65_536)),
                recv: (seed, 65_536),
            },
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// Sends a greeting offering `methods` and returns the method the server chose.
async fn offer(proxy: SocketAddr, methods: &[u8]) -> (TcpStream, u8) {
    let mut s = within(LIMIT, "connect", TcpStream::connect(proxy))
        .await
        .unwrap_or_else(|e| panic!("connect {proxy}: {e}"));
    s.write_all(&socks::greeting_methods(methods))
        .await
        .unwrap();
    let m = within(LIMIT, "method selection", socks::read_method_choice(&mut s))
        .await
        .unwrap_or_else(|e| panic!("method selection from {proxy} for {methods:02x?}: {e}"));
    (s, m)
}

fn start_username_only() -> Option<Daemon> {
    if !require_privileged("RFC 1929 authentication") {
        return None;
    }
    Some(Daemon::start(DaemonOpts {
        extra_toml: users().auth_toml(&["username"]),
        ..DaemonOpts::default()
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_auth_success_then_connect() {
    let Some(daemon) = start_username_only() else {
        return;
    };
    let target = Echo::start("127.0.0.1:0").await;
    let mut s = socks::connect_auth(daemon.addr(), &Auth::user("alice", ALICE_PW), target.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    echo(&mut s, 0xa0a0_0001, "echo after authentication").await;
    wait_counter(&daemon, "auth_successes", 1).await;
    wait_counter(&daemon, "auth_failures", 0).await;
    daemon.stop();
}

/// A wrong password (and an unknown user) gets a non-zero status and a close;
/// `auth_failures` counts each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_auth_wrong_password_is_refused() {
    let Some(daemon) = start_username_only() else {
        return;
    };
    for (i, (user, pass)) in [("alice", "wrong password"), ("mallory", ALICE_PW)]
        .into_iter()
        .enumerate()
    {
        let (mut s, m) = offer(daemon.addr(), &[socks::METHOD_USERPASS]).await;
        assert_eq!(m, socks::METHOD_USERPASS, "method chosen");
        s.write_all(&socks::userpass_request(user, pass))
            .await
            .unwrap();
        let status = within(LIMIT, "RFC 1929 reply", socks::read_auth_status(&mut s))
            .await
            .unwrap_or_else(|e| panic!("RFC 1929 reply for {user:?}: {e}"));
        assert_ne!(status, 0, "{user:?} with a wrong password got status 0");
        wait_closed(
            &mut s,
            PROMPT,
            &format!("after the failed login of {user:?}"),
        )
        .await;
        wait_counter(&daemon, "auth_failures", i as u64 + 1).await;
    }
    wait_counter(&daemon, "auth_successes", 0).await;
    daemon.stop();
}

/// A client that offers only "no authentication" to a username-only server gets X'FF' and
/// a close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_auth_missing_credentials_gets_ff() {
    let Some(daemon) = start_username_only() else {
        return;
    };
    let (mut s, m) = offer(daemon.addr(), &[socks::METHOD_NO_AUTH]).await;
    assert_eq!(
        m,
        socks::METHOD_NO_ACCEPTABLE,
        "method chosen for a no-auth-only client"
    );
    wait_closed(&mut s, PROMPT, "after X'FF'").await;
    daemon.stop();
}

/// The server picks the first of its methods that the client offers. With "none" first, a
/// client offering both (as curl does when the proxy URL has a user name) is never asked to
/// log in, so a rule naming a user never matches it: the daemon warns at start-up. With
/// "username" first, reloaded, that client logs in and the rule passes it, while a client
/// offering only "none" still gets "none", and the reloaded file draws no warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_first_lets_a_client_offering_both_log_in() {
    if !require_privileged("RFC 1929 authentication") {
        return;
    }
    const WARNING: &str = "`auth.methods`: \"none\" comes before \"username\"";
    let rules = "[[socks_rule]]\nname = \"alice\"\naction = \"pass\"\nusers = [\"alice\"]\n";
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: format!("{}{rules}", users().auth_toml(&["none", "username"])),
        ..DaemonOpts::default()
    });
    let log = daemon.stderr_log();
    assert_eq!(
        log.matches(WARNING).count(),
        1,
        "no start-up warning:\n{log}"
    );
    let target = Echo::start("127.0.0.1:0").await;
    let both = [socks::METHOD_NO_AUTH, socks::METHOD_USERPASS];
    let (_s, m) = offer(daemon.addr(), &both).await;
    assert_eq!(m, socks::METHOD_NO_AUTH, "\"none\" first: method chosen");

    daemon.rewrite_config(&format!(
        "{}{rules}",
        users().auth_toml(&["username", "none"])
    ));
    daemon.sighup();
    proxy_integration::checks::wait_log(&daemon, "configuration reloaded", 1).await;
    let (mut s, m) = offer(daemon.addr(), &both).await;
    assert_eq!(
        m,
        socks::METHOD_USERPASS,
        "\"username\" first: method chosen"
    );
    s.write_all(&socks::userpass_request("alice", ALICE_PW))
        .await
        .unwrap();
    let status = within(LIMIT, "RFC 1929 reply", socks::read_auth_status(&mut s))
        .await
        .unwrap_or_else(|e| panic!("RFC 1929 reply: {e}"));
    assert_eq!(status, 0, "alice's login");
    s.write_all(&socks::request(socks::CMD_CONNECT, &target.addr.into()))
        .await
        .unwrap();
    let reply = within(LIMIT, "reply", socks::read_reply(&mut s))
        .await
        .unwrap_or_else(|e| panic!("reply: {e}"));
    assert_eq!(reply.code, socks::REP_SUCCEEDED, "alice's CONNECT");
    echo(&mut s, 0xa0a0_0009, "echo for alice").await;
    // A client without credentials still needs none, and the rule does not pass it.
    let (_s, m) = offer(daemon.addr(), &[socks::METHOD_NO_AUTH]).await;
    assert_eq!(m, socks::METHOD_NO_AUTH, "a client offering only \"none\"");
    let log = daemon.stderr_log();
    assert_eq!(
        log.matches(WARNING).count(),
        1,
        "the reloaded file drew the warning too:\n{log}"
    );
    daemon.stop();
}

/// Per-client-rule methods: 127.0.0.0/8 may only use "none", ::1 only "username", while
/// the server offers both (username first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rule_methods_per_address_family() {
    if !require_privileged("per-client-rule authentication methods") {
        return;
    }
    if std::net::TcpListener::bind("[::1]:0").is_err()
        && !skip_or_panic("IPv6", "cannot bind [::1]")
    {
        return;
    }
    let extra = format!(
        "{}\n[[client_rule]]\nname = \"v4-open\"\naction = \"pass\"\nfrom = [\"127.0.0.0/8\"]\nmethods = [\"none\"]\n\
         \n[[client_rule]]\nname = \"v6-login\"\naction = \"pass\"\nfrom = [\"::1/128\"]\nmethods = [\"username\"]\n",
        users().auth_toml(&["username", "none"])
    );
    let daemon = Daemon::start(DaemonOpts {
        listen: vec!["127.0.0.1:0".into(), "[::1]:0".into()],
        extra_toml: extra,
        allow_clients: false,
        ..DaemonOpts::default()
    });
    let v4 = *daemon
        .addrs()
        .iter()
        .find(|a| a.is_ipv4())
        .expect("IPv4 listener");
    let v6 = *daemon
        .addrs()
        .iter()
        .find(|a| a.is_ipv6())
        .expect("IPv6 listener");
    let target4 = Echo::start("127.0.0.1:0").await;
    let target6 = Echo::start("[::1]:0").await;

    // IPv4 loopback: no authentication, even when the client also offers username.
    let mut s = socks::connect_auth(v4, &Auth::None, target4.addr)
        .await
        .unwrap_or_else(|e| panic!("IPv4 client without auth: {e}"));
    echo(&mut s, 0xa0a0_0004, "IPv4 client without auth").await;
    let (s, m) = offer(v4, &[socks::METHOD_NO_AUTH, socks::METHOD_USERPASS]).await;
    assert_eq!(m, socks::METHOD_NO_AUTH, "IPv4 client offering both");
    drop(s);
    let (mut s, m) = offer(v4, &[socks::METHOD_USERPASS]).await;
    assert_eq!(
        m,
        socks::METHOD_NO_ACCEPTABLE,
        "IPv4 client offering only username: its rule allows only none"
    );
    wait_closed(&mut s, PROMPT, "IPv4 client after X'FF'").await;

    // IPv6 loopback: must authenticate.
    let (mut s, m) = offer(v6, &[socks::METHOD_NO_AUTH]).await;
    assert_eq!(
        m,
        socks::METHOD_NO_ACCEPTABLE,
        "IPv6 client offering only none"
    );
    wait_closed(&mut s, PROMPT, "IPv6 client after X'FF'").await;
    let (s, m) = offer(v6, &[socks::METHOD_NO_AUTH, socks::METHOD_USERPASS]).await;
    assert_eq!(m, socks::METHOD_USERPASS, "IPv6 client offering both");
    drop(s);
    let mut s = socks::connect_auth(v6, &Auth::user("alice", ALICE_PW), target6.addr)
        .await
        .unwrap_or_else(|e| panic!("IPv6 client with username: {e}"));
    echo(&mut s, 0xa0a0_0006, "IPv6 client after authentication").await;
    wait_counter(&daemon, "auth_successes", 1).await;
    daemon.stop();
}
