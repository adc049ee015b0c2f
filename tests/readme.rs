//! The README holds for a reader of the repository. Its Rust examples are the crate
//! docs' doc-tests: each ```rust block of README.md appears, line for line, in the crate
//! docs (src/lib.rs), where `cargo test --doc` compiles it. Every path it names is in the
//! repository, and none is outside it.

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
        "PORTFERRY_RELAY=localhost:7835\n",
        "export PORTFERRY_RELAY PORTFERRY_TOKEN PORTFERRY_RELAY_CA",
        // The lean dependency (item 5).
        r#"default-features = false, features = ["agent"]"#,
    ] {
        assert!(readme.contains(needed), "the README lacks {needed:?}");
    }
}

/// The file extensions that make a word with a `/` a file path, whatever its directory.
const FILE_EXTENSIONS: [&str; 9] = [
    "rs", "md", "sh", "toml", "txt", "patch", "py", "json", "lock",
];

/// The words of `readme` that name a path in the repository: relative paths that end in
/// a file extension or start with one of the repository's top-level `entries`, the
/// directory of every `cd`, and the sources of `--bench NAME` and `fuzz run NAME`. URLs,
/// absolute and home paths, placeholders (`<…>`, `$…`) and the build's output
/// (`target/`) are not the repository's.
fn repository_paths(readme: &str, entries: &[String]) -> Vec<String> {
    let separators = |c: char| c.is_whitespace() || "`()[],;\"'".contains(c);
    let words: Vec<&str> = readme
        .split(separators)
        .map(|word| word.trim_end_matches(['.', ':']))
        .filter(|word| !word.is_empty())
        .collect();
    let mut paths = Vec::new();
    for (i, word) in words.iter().enumerate() {
        let after_cd = i > 0 && words[i - 1] == "cd";
        let is_path_like = word.contains('/')
            && !word.contains("://")
            && !word.starts_with(['/', '~', '$', '<'])
            && !word.contains(['<', '>', '*', '…', '{', '}'])
            && !word.starts_with("target/");
        let named = is_path_like
            && (word
                .rsplit_once('.')
                .is_some_and(|(_, extension)| FILE_EXTENSIONS.contains(&extension))
                || entries
                    .iter()
                    .any(|entry| word.split('/').next() == Some(entry)));
        if named || after_cd {
            paths.push((*word).to_owned());
        } else if i > 0 && words[i - 1] == "--bench" {
            paths.push(format!("benches/{word}.rs"));
        } else if i > 1 && words[i - 2..i] == ["fuzz", "run"] {
            paths.push(format!("fuzz/fuzz_targets/{word}.rs"));
        }
    }
    paths
}

#[test]
fn every_path_the_readme_names_is_in_the_repository() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    if root.join("Cargo.toml.orig").exists() {
        // A copy made by `cargo package`: the repository's other packages, fuzz/ and
        // .ci/ are not in it.
        eprintln!("a packaged copy, not the repository: skipped");
        return;
    }
    let readme = include_str!("../README.md");
    assert!(
        !readme.contains("../"),
        "the README names a path outside the repository"
    );
    let entries: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "target")
        .collect();
    let paths = repository_paths(readme, &entries);
    for expected in [
        "examples/listen_hyper.rs",
        "smoltcp-patched/PATCHES.md",
        ".ci/run",
        "fuzz",
        "benches/tunnel.rs",
        "fuzz/fuzz_targets/frame_decode.rs",
    ] {
        assert!(
            paths.iter().any(|path| path == expected),
            "{expected} is not recognised as a path: {paths:?}"
        );
    }
    let missing: Vec<&String> = paths
        .iter()
        .filter(|path| !root.join(path).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "the README names paths the repository lacks: {missing:?}"
    );
}

#[test]
fn readme_paths_are_told_from_other_words() {
    let entries = ["src".to_owned(), ".ci".to_owned()];
    let text = "see `src/lib.rs`, [the tool](tools/x.sh) and `.ci/run`; cd fuzz && \
                cargo +nightly fuzz run decode. `cargo bench --bench frame`. Not http/1.1, \
                s/GB, /etc/hosts, ~/.local/state, https://docs.rs/a.rs, \
                `<state-dir>/leases` or target/release/portferry.";
    assert_eq!(
        repository_paths(text, &entries),
        [
            "src/lib.rs",
            "tools/x.sh",
            ".ci/run",
            "fuzz",
            "fuzz/fuzz_targets/decode.rs",
            "benches/frame.rs"
        ]
    );
}
