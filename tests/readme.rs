//! The README's Rust examples are the crate docs' doc-tests: each ```rust block of
//! README.md appears, line for line, in the crate docs (src/lib.rs), where
//! `cargo test --doc` compiles it.

/// The ```rust blocks of `text`, each as its lines.
fn rust_blocks(text: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        match &mut current {
            None if trimmed.starts_with("```rust") => current = Some(Vec::new()),
            None => {}
            Some(_) if trimmed == "```" => blocks.push(current.take().unwrap()),
            Some(block) => block.push(line.trim_end().to_owned()),
        }
    }
    blocks
}

#[test]
fn every_readme_example_is_a_doc_test_of_the_crate() {
    let readme = include_str!("../README.md");
    let crate_docs: String = include_str!("../src/lib.rs")
        .lines()
        .filter_map(|line| line.strip_prefix("//!"))
        .map(|line| line.strip_prefix(' ').unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n");
    let doc_blocks = rust_blocks(&crate_docs);
    let readme_blocks = rust_blocks(readme);
    assert!(
        readme_blocks.len() >= 2,
        "the README's Rust examples are gone"
    );
    for block in readme_blocks {
        assert!(
            doc_blocks.contains(&block),
            "this README example is not a doc-test in src/lib.rs:\n{}",
            block.join("\n")
        );
    }
}

#[test]
fn the_readme_says_what_clients_and_jupyter_need() {
    let readme = include_str!("../README.md");
    for needed in [
        // Jupyter refuses proxied requests without it (issue 11 item 12).
        "--ServerApp.allow_remote_access=True",
        // Clients that do not resolve *.localhost themselves (item 3).
        "curl --resolve",
        "openssl s_client -connect 127.0.0.1:8443 -servername",
        // What the relay prints, as it prints it (item 4).
        "export PORTFERRY_RELAY=localhost:7835",
        // The lean dependency (item 5).
        r#"default-features = false, features = ["agent"]"#,
    ] {
        assert!(readme.contains(needed), "the README lacks {needed:?}");
    }
}
