//! Agent tokens: the secret an agent presents to the relay.

use std::fmt;
use std::io;
use std::path::Path;

use crate::state_dir::StateDir;

/// File name of the generated token inside the state directory.
const TOKEN_FILE: &str = "token";

/// An agent's secret. Compared in constant time; never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Token {
        Token(secret.into())
    }

    /// A fresh random token: 32 bytes from the OS CSPRNG, as 64 hex digits.
    pub fn generate() -> Token {
        let bytes: [u8; 32] = rand::random();
        Token(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The secret itself, for sending it or writing it where the operator asked.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time that depends only on the lengths.
    pub fn matches(&self, presented: &str) -> bool {
        same_bytes(self.0.as_bytes(), presented.as_bytes())
    }
}

/// Whether `ours` and `theirs` are equal, in time that depends only on their lengths
/// (for secrets: where they differ is not told).
pub(crate) fn same_bytes(ours: &[u8], theirs: &[u8]) -> bool {
    if ours.len() != theirs.len() {
        return false;
    }
    ours.iter()
        .zip(theirs)
        .fold(0u8, |diff, (a, b)| diff | (a ^ b))
        == 0
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Reads a tokens file: one token per line; blank lines and lines starting with `#`
/// are skipped.
pub fn read_tokens_file(path: &Path) -> io::Result<Vec<Token>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read tokens file {}: {e}", path.display()),
        )
    })?;
    Ok(parse_tokens(&text).collect())
}

/// The tokens of a tokens file's text: one per line, skipping blank and `#` lines.
fn parse_tokens(text: &str) -> impl Iterator<Item = Token> + '_ {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(Token::new)
}

/// The token kept in `state_dir/token`, made on first use; the directory is opened as a
/// [`StateDir`] (only the owner may reach it) and the file is written mode 0600.
pub fn local_token(state_dir: &Path) -> io::Result<Token> {
    let dir = StateDir::open(state_dir)?;
    if let Some(text) = dir.read(TOKEN_FILE)? {
        if let Some(token) = parse_tokens(&String::from_utf8_lossy(&text)).next() {
            return Ok(token);
        }
    }
    let token = Token::generate();
    dir.write(TOKEN_FILE, format!("{}\n", token.expose()).as_bytes())?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_same_secret() {
        let token = Token::new("s3cret");
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3creT"));
        assert!(!token.matches("s3cre"));
        assert!(!token.matches(""));
    }

    #[test]
    fn the_local_token_is_made_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("portferry-token-{}", rand::random::<u64>()));
        let first = local_token(&dir).unwrap();
        assert_eq!(local_token(&dir).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(&dir.join(TOKEN_FILE)), 0o600);
            // A directory someone loosened is tightened when the token is next used.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            assert_eq!(local_token(&dir).unwrap(), first);
            assert_eq!(mode(&dir), 0o700);
        }
        // A token file without a token gets a fresh token.
        std::fs::write(dir.join(TOKEN_FILE), "# nothing\n").unwrap();
        let second = local_token(&dir).unwrap();
        assert_ne!(second, first);
        assert_eq!(local_token(&dir).unwrap(), second);
        std::fs::write(dir.join("tokens"), "# agents\n\nabc\n  def  \n").unwrap();
        let tokens = read_tokens_file(&dir.join("tokens")).unwrap();
        assert_eq!(tokens, vec![Token::new("abc"), Token::new("def")]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn never_shows_the_secret() {
        let token = Token::generate();
        assert_eq!(token.expose().len(), 64);
        assert!(!format!("{token:?}").contains(token.expose()));
    }
}
