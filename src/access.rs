//! The token the web endpoints (the console page, its `/events`, Prometheus `/metrics`) require
//! when they listen beyond loopback: set by `security.token` or `MIRAGE_TOKEN`, else made at
//! start; presented as `?token=…` or `Authorization: Bearer …`, compared in constant time.

use std::io::Read;

/// The environment variable that sets the token (over a generated one; `security.token` wins).
pub const TOKEN_ENV: &str = "MIRAGE_TOKEN";

/// Why a request was not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No token presented (HTTP 401).
    Missing,
    /// A token that is not this run's (HTTP 403).
    Wrong,
}

/// A run's web token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// The configured token, else `MIRAGE_TOKEN`, else 128 random bits from the OS, as hex.
    pub fn resolve(configured: Option<&str>) -> Result<Token, String> {
        if let Some(t) = configured.map(str::to_string).or_else(|| std::env::var(TOKEN_ENV).ok()) {
            return Token::new(&t);
        }
        let mut bytes = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(|e| format!("security.token: no randomness to make one ({e}); set it"))?;
        Ok(Token(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// A given token: at least 16 characters a URL carries unescaped.
    pub fn new(text: &str) -> Result<Token, String> {
        let ok = text.len() >= 16 && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        match ok {
            true => Ok(Token(text.to_string())),
            false => Err("security.token: use at least 16 characters from A-Z a-z 0-9 - . _ ~".into()),
        }
    }

    /// The token, for the URL printed once at start.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a request with `query` (the part after `?`) and `authorization` (the header's
    /// value) may be served.
    pub fn check(&self, query: Option<&str>, authorization: Option<&str>) -> Result<(), Denied> {
        let from_query =
            query.into_iter().flat_map(|q| q.split('&')).find_map(|kv| kv.strip_prefix("token="));
        let from_header = authorization.and_then(|a| a.trim().strip_prefix("Bearer ")).map(str::trim);
        match from_header.or(from_query) {
            None => Err(Denied::Missing),
            Some(t) if constant_time_eq(t.as_bytes(), self.0.as_bytes()) => Ok(()),
            Some(_) => Err(Denied::Wrong),
        }
    }
}

/// Equality whose time depends on the lengths only, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    a.len() == b.len() && diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_taken_from_the_query_or_a_bearer_header_and_nothing_else() {
        let t = Token::new("0123456789abcdef").unwrap();
        assert_eq!(t.check(Some("token=0123456789abcdef"), None), Ok(()));
        assert_eq!(t.check(Some("x=1&token=0123456789abcdef"), None), Ok(()));
        assert_eq!(t.check(None, Some("Bearer 0123456789abcdef")), Ok(()));
        assert_eq!(t.check(None, None), Err(Denied::Missing));
        assert_eq!(t.check(Some("x=1"), Some("Basic abc")), Err(Denied::Missing));
        for wrong in ["token=0123456789abcdeF", "token=0123456789abcde", "token=", "token=0123456789abcdef0"]
        {
            assert_eq!(t.check(Some(wrong), None), Err(Denied::Wrong), "{wrong}");
        }
    }

    #[test]
    fn made_tokens_are_long_and_differ_and_given_ones_are_checked() {
        let (a, b) = (Token::resolve(None).unwrap(), Token::resolve(None).unwrap());
        if std::env::var(TOKEN_ENV).is_err() {
            assert_ne!(a, b);
        }
        assert!(a.as_str().len() >= 16);
        assert!(Token::new("short").is_err() && Token::new("has spaces in it ok").is_err());
        assert_eq!(Token::resolve(Some("abcdefghijklmnop")).unwrap().as_str(), "abcdefghijklmnop");
        assert!(!format!("{a:?}").contains(a.as_str()), "the token is not logged by Debug");
    }
}
