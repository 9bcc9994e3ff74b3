//! Access tokens: when a server is given a token file, every HTTP, WebSocket and SSE request and
//! every Kafka connection must present one of its tokens (HTTP: `Authorization: Bearer <token>`
//! or `access_token=<token>` in the query; Kafka: SASL/PLAIN with the token as the password).
//!
//! The file holds one token per line; blank lines and lines starting with `#` are skipped. A
//! token is 16 to 512 visible ASCII characters, optionally followed by `read-only` (see
//! [`Access`]). Tokens are compared in constant time, by their SHA-256 digests, so that neither
//! their content nor their length shows in the time taken.

use std::path::Path;

/// The shortest token accepted: shorter ones are guessable.
pub const TOKEN_BYTES_MIN: usize = 16;
const TOKEN_BYTES_MAX: usize = 512;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Everything.
    Full,
    /// Read and consume: read topics and streams, follow them live, consume subscriptions and
    /// Kafka consumer groups; not write events or change what the server holds.
    ReadOnly,
}

/// The tokens a server accepts, kept as their SHA-256 digests: comparing digests of the same
/// length takes the same time whatever the length of the token given.
pub struct Tokens(Vec<([u8; 32], Access)>);

fn digest(token: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(token).into()
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} tokens)", self.0.len())
    }
}

impl Tokens {
    /// Reads a token file; an error names the line at fault (never the token).
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
        Tokens::parse(&text).map_err(|e| format!("token file {}: {e}", path.display()))
    }

    /// Tokens from the text of a token file.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut tokens = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_ascii_whitespace();
            let token = words.next().unwrap_or_default();
            if !(TOKEN_BYTES_MIN..=TOKEN_BYTES_MAX).contains(&token.len())
                || !token.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(format!(
                    "line {}: a token is {TOKEN_BYTES_MIN} to {TOKEN_BYTES_MAX} visible ASCII \
                     characters without spaces",
                    i + 1
                ));
            }
            let access = match (words.next(), words.next()) {
                (None, _) => Access::Full,
                (Some("read-only"), None) => Access::ReadOnly,
                _ => {
                    return Err(format!(
                        "line {}: after the token only `read-only` may follow",
                        i + 1
                    ));
                }
            };
            tokens.push((digest(token.as_bytes()), access));
        }
        if tokens.is_empty() {
            return Err("no token in it".into());
        }
        Ok(Tokens(tokens))
    }

    /// What `given` may do, `None` when it is none of the tokens. Takes the same time whichever
    /// token it matches, or where a wrong one differs.
    pub fn access(&self, given: &[u8]) -> Option<Access> {
        let given = digest(given);
        let (mut full, mut read_only) = (0u8, 0u8);
        for (t, access) in &self.0 {
            let hit = u8::from(constant_time_eq(t, &given));
            full |= hit & u8::from(*access == Access::Full);
            read_only |= hit & u8::from(*access == Access::ReadOnly);
        }
        // The same token listed twice with both kinds of access gets everything.
        match (full, read_only) {
            (1, _) => Some(Access::Full),
            (0, 1) => Some(Access::ReadOnly),
            _ => None,
        }
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_take_comments_and_refuse_short_or_spaced_tokens() {
        let t = Tokens::parse("# ops team\n\n  0123456789abcdef-ops  \nsecond-token-0123456789\n")
            .unwrap();
        assert!(t.access(b"0123456789abcdef-ops").is_some());
        assert!(t.access(b"second-token-0123456789").is_some());
        for wrong in [
            &b""[..],
            b"0123456789abcdef-op",
            b"0123456789abcdef-opsx",
            b"# ops team",
        ] {
            assert!(t.access(wrong).is_none(), "{wrong:?}");
        }
        for bad in [
            "short",
            "has a space in the token",
            "",
            "# only a comment\n",
        ] {
            assert!(Tokens::parse(bad).is_err(), "{bad:?}");
        }
        let e = Tokens::parse("ok-token-0123456789\ntoo-short\n").unwrap_err();
        assert!(e.contains("line 2") && !e.contains("too-short"), "{e}");
        assert_eq!(format!("{t:?}"), "Tokens(2 tokens)");
    }

    #[test]
    fn a_token_may_be_read_only() {
        let t =
            Tokens::parse("full-token-0123456789\nreader-token-0123456789   read-only\n").unwrap();
        assert_eq!(t.access(b"full-token-0123456789"), Some(Access::Full));
        assert_eq!(t.access(b"reader-token-0123456789"), Some(Access::ReadOnly));
        assert_eq!(t.access(b"reader-token-0123456789 read-only"), None);
        for bad in [
            "reader-token-0123456789 read",
            "reader-token-0123456789 read-only extra",
        ] {
            let e = Tokens::parse(bad).unwrap_err();
            assert!(e.contains("line 1") && !e.contains("reader-token"), "{e}");
        }
    }
}
