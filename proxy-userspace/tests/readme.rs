//! The README shows the embedded default configuration as the reference; keep them identical.

#[test]
fn readme_shows_the_embedded_default_configuration() {
    let readme = include_str!("../../README.md");
    assert!(
        readme.contains(ebsocks::config::DEFAULT_CONFIG),
        "README.md's configuration block differs from config::DEFAULT_CONFIG; paste the constant into it"
    );
}
