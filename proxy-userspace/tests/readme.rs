//! The README shows the embedded default configuration as the reference; keep them identical.

#[test]
fn readme_shows_the_embedded_default_configuration() {
    let readme = include_str!("../../README.md");
    assert!(
        readme.contains(ebsocks::config::DEFAULT_CONFIG),
        "README.md's configuration block differs from config::DEFAULT_CONFIG; paste the constant into it"
    );
}

/// Every TOML example in the README is a valid configuration that draws no warning: an
/// example is what operators copy.
#[test]
fn readme_examples_are_valid_and_draw_no_warning() {
    let readme = include_str!("../../README.md");
    let users = std::env::temp_dir().join(format!("ebsocks-readme-{}.users", std::process::id()));
    let hash = ebsocks::auth::hash_password("x");
    std::fs::write(&users, format!("alice:{hash}\n")).unwrap();
    let mut blocks = 0;
    let mut rest = readme;
    let mut outcome = Vec::new();
    while let Some(start) = rest.find("```toml\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("an unterminated TOML block");
        let text = body[..end].replace(
            "\"/etc/ebsocks/users\"",
            &format!("{:?}", users.display().to_string()),
        );
        blocks += 1;
        match ebsocks::config::Config::parse(&text) {
            Ok(c) => outcome.extend(c.warnings().into_iter().map(|w| format!("{text}\n=> {w}"))),
            Err(e) => outcome.push(format!("{text}\n=> {e}")),
        }
        rest = &body[end..];
    }
    let _ = std::fs::remove_file(&users);
    assert!(blocks >= 3, "the README's TOML blocks were not found");
    assert!(outcome.is_empty(), "{}", outcome.join("\n\n"));
}
