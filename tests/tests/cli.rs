//! `ebsocks check-config`, as an operator calls it: the file as an argument or as `--config`
//! (the way `run` takes it), the effective configuration on success, and on a bad file exit
//! status 2 with the key and the problem named, and a quiet end when its reader has gone. Needs
//! no privileges.

use std::process::{Command, Output};

use proxy_integration::daemon::daemon_binary;

fn check_config(args: &[&str]) -> Output {
    Command::new(daemon_binary())
        .arg("check-config")
        .args(args)
        .output()
        .expect("run ebsocks check-config")
}

fn temp_config(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("ebsocks-cli-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).expect("write the config");
    path
}

#[test]
fn check_config_takes_the_file_either_way() {
    let path = temp_config(
        "good",
        "listen = [\"127.0.0.1:1081\"]\ndata_path = \"splice\"\n",
    );
    let file = path.to_str().unwrap();
    for args in [vec![file], vec!["--config", file]] {
        let out = check_config(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(
            stdout.contains("127.0.0.1:1081") && stdout.contains("data_path = \"splice\""),
            "{args:?} printed:\n{stdout}"
        );
    }
    let out = check_config(&[file, "--config", file]);
    assert!(!out.status.success(), "both forms at once were accepted");
    let out = check_config(&[]);
    assert!(!out.status.success(), "no file was accepted");
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_bad_config_exits_2_naming_the_key() {
    let path = temp_config("bad", "[timeouts]\nidle = \"soon\"\n");
    let out = check_config(&["--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr.contains("`timeouts.idle`") && stderr.contains("\"soon\""),
        "{stderr}"
    );
    let _ = std::fs::remove_file(path);
}

/// A valid file with settings that can never apply (a rule naming a user the users file does
/// not list) is printed with exit status 0, the warning on stderr naming the key.
#[test]
fn check_config_warns_about_what_never_applies() {
    let users = proxy_integration::UsersFile::new(&[("alice", "pw")]);
    let path = temp_config(
        "warn",
        &format!(
            "{}[[socks_rule]]\nname = \"staff\"\naction = \"pass\"\nusers = [\"alcie\"]\n",
            users.auth_toml(&["username"])
        ),
    );
    let out = check_config(&[path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stderr.contains(
            "warning: `socks_rule[0].users`: \"alcie\" (rule \"staff\") is not in auth.users_file"
        ),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("staff"));
    let _ = std::fs::remove_file(path);
}

/// `run --listen` with two addresses that cannot both be bound stops before anything is
/// loaded, naming both, with exit status 2 (it used to fail binding the second, with "Address
/// already in use" as if another program held the port).
#[test]
fn run_with_overlapping_listen_addresses_exits_2() {
    let out = Command::new(daemon_binary())
        .args(["run", "--listen", "0.0.0.0:1", "--listen", "127.0.0.1:1"])
        .output()
        .expect("run ebsocks run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--listen #2: 127.0.0.1:1 and --listen #1, 0.0.0.0:1, overlap"),
        "{stderr}"
    );
}

/// Output into a reader that went away (`ebsocks check-config F | head -1`, once head has
/// exited) ends the command quietly with status 0: no panic, nothing on stderr.
#[test]
fn output_into_a_closed_pipe_is_a_quiet_end() {
    let path = temp_config("pipe", "listen = [\"127.0.0.1:1082\"]\n");
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(daemon_binary())
        .arg("check-config")
        .arg(&path)
        .stdout(writer)
        .output()
        .expect("run ebsocks check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.is_empty(),
        "{}: {stderr}",
        out.status
    );
    let _ = std::fs::remove_file(path);
}
