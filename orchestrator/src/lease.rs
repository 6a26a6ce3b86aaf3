//! Lease tokens: the secret a leased registration is written with.
//!
//! A token is 256 bits from the operating system's CSPRNG, sent to the client once (hex) and
//! never kept: the stores keep its SHA-256 ([`LeaseHash`]) and compare the hash of what a
//! request presents. Comparing digests of the secret (not the secret) makes timing irrelevant
//! even where a plain comparison is used (the Valkey scripts); in Rust the comparison is
//! constant-time anyway. See the README's "Threat model".

use servicekit::protocol::LeaseToken;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;

/// The SHA-256 of a lease token: what a store keeps and compares. Its `Debug` does not show
/// it (it is not the secret, but nothing gains from printing it).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LeaseHash([u8; 32]);

impl std::fmt::Debug for LeaseHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseHash(***)")
    }
}

impl LeaseHash {
    /// The hash of a presented token (any bytes; a wrong one just hashes to another value).
    pub fn of(token: &[u8]) -> LeaseHash {
        LeaseHash(Sha256::digest(token).into())
    }

    /// Constant-time equality.
    pub fn matches(&self, other: &LeaseHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// Lower-case hex, as the Valkey record keeps it.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    /// The hash from its hex form (either case); `None` when it is not 64 hex digits.
    pub fn from_hex(text: &str) -> Option<LeaseHash> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let digit = |c: u8| char::from(c).to_digit(16);
            *byte = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
        }
        Some(LeaseHash(out))
    }
}

/// A fresh token and its hash. Fails only when the OS has no randomness to give.
pub fn mint() -> Result<(LeaseToken, LeaseHash), getrandom::Error> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes)?;
    let token = hex(&bytes);
    let hash = LeaseHash::of(token.as_bytes());
    Ok((LeaseToken::new(token), hash))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_256_bit_hex_and_only_their_hash_matches() {
        let (a, ha) = mint().expect("randomness");
        let (b, hb) = mint().expect("randomness");
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 64);
        assert!(a.expose().bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(ha.matches(&LeaseHash::of(a.expose().as_bytes())));
        assert!(!ha.matches(&hb));
        assert!(!format!("{ha:?}").contains(&ha.hex()[..8]));
        assert_eq!(LeaseHash::from_hex(&ha.hex()), Some(ha));
        assert_eq!(LeaseHash::from_hex(&ha.hex().to_uppercase()), Some(ha));
        assert_eq!(LeaseHash::from_hex("ab"), None);
        assert_eq!(LeaseHash::from_hex(&"g".repeat(64)), None);
        // The SHA-256 of "abc", so the Lua side can trust the hex form.
        assert_eq!(
            LeaseHash::of(b"abc").hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
