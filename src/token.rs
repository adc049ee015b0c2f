//! Agent tokens: the secret an agent presents to the relay.

use std::fmt;
use std::io;
use std::path::Path;

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
        let (ours, theirs) = (self.0.as_bytes(), presented.as_bytes());
        if ours.len() != theirs.len() {
            return false;
        }
        ours.iter()
            .zip(theirs)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
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
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(Token::new)
        .collect())
}

/// The token kept in `state_dir/token` (only the owner may read it), made on first use.
pub fn local_token(state_dir: &Path) -> io::Result<Token> {
    let path = state_dir.join("token");
    if let Some(token) = read_tokens_file(&path)
        .ok()
        .and_then(|tokens| tokens.into_iter().next())
    {
        return Ok(token);
    }
    std::fs::create_dir_all(state_dir)?;
    let token = Token::generate();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    io::Write::write_all(
        &mut options.open(&path)?,
        format!("{}\n", token.expose()).as_bytes(),
    )?;
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
