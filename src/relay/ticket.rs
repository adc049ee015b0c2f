//! Resume tickets: the secret by which an agent proves, on a new link, that it is the
//! agent a lease belongs to.
//!
//! The relay issues a ticket in the [`Welcome`](crate::wire::Welcome) of an agent's first
//! link: [`TICKET_LEN`] bytes from the OS CSPRNG, a 16-byte *selector* that names the
//! agent, then a 32-byte secret. It keeps only the selector and a [`Verifier`] (the
//! SHA-256 of the whole ticket), in memory and in the lease file, so that reading the
//! file does not allow anyone to present the ticket. A presented ticket is looked up by
//! its selector and checked against the verifier in constant time.

use std::fmt;

use bytes::Bytes;
use rand::TryRngCore;

use crate::wire::TICKET_LEN;

/// The public part of a ticket, which names its agent.
pub(crate) type Selector = [u8; 16];

/// What the relay keeps of a ticket: its SHA-256.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verifier([u8; 32]);

/// A resume ticket.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Ticket([u8; TICKET_LEN]);

impl Ticket {
    /// A fresh ticket from the OS random number generator.
    pub(crate) fn generate() -> Ticket {
        let mut bytes = [0u8; TICKET_LEN];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .expect("the OS random number generator failed");
        Ticket(bytes)
    }

    /// The ticket in `bytes`, if it has a ticket's length.
    pub(crate) fn parse(bytes: &[u8]) -> Option<Ticket> {
        Some(Ticket(bytes.try_into().ok()?))
    }

    /// The agent it names.
    pub(crate) fn selector(&self) -> Selector {
        let mut selector = [0u8; 16];
        selector.copy_from_slice(&self.0[..16]);
        selector
    }

    /// What the relay keeps of it.
    pub(crate) fn verifier(&self) -> Verifier {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.0);
        let mut verifier = [0u8; 32];
        verifier.copy_from_slice(digest.as_ref());
        Verifier(verifier)
    }

    /// The ticket as the welcome carries it.
    pub(crate) fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(&self.0)
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ticket(<redacted>)")
    }
}

impl Verifier {
    /// Whether `ticket` is the ticket this verifier was made from, in time that does not
    /// depend on where they differ.
    pub(crate) fn matches(&self, ticket: &Ticket) -> bool {
        crate::token::same_bytes(&self.0, &ticket.verifier().0)
    }

    /// 64 hex digits, for the lease file.
    pub(crate) fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads [`to_hex`](Self::to_hex)'s digits; `None` if they are not 64 hex digits.
    pub(crate) fn from_hex(text: &str) -> Option<Verifier> {
        Some(Verifier(from_hex(text)?))
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Verifier({})", self.to_hex())
    }
}

/// The `N` bytes written as `2 * N` hex digits in `text`.
pub(crate) fn from_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut bytes = [0u8; N];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_matches_its_own_verifier_only() {
        let ticket = Ticket::generate();
        let other = Ticket::generate();
        assert_ne!(ticket, other);
        assert_ne!(ticket.selector(), other.selector());
        let verifier = ticket.verifier();
        assert!(verifier.matches(&ticket));
        assert!(!verifier.matches(&other));
        // The same selector with another secret is not the ticket.
        let mut forged = ticket.to_bytes().to_vec();
        forged[TICKET_LEN - 1] ^= 1;
        let forged = Ticket::parse(&forged).unwrap();
        assert_eq!(forged.selector(), ticket.selector());
        assert!(!verifier.matches(&forged));
        // What the relay keeps does not contain the secret.
        let kept = verifier.to_hex();
        let secret: String = ticket.0[16..].iter().map(|b| format!("{b:02x}")).collect();
        assert!(!kept.contains(&secret));
        assert_eq!(Verifier::from_hex(&kept), Some(verifier));
        assert_eq!(format!("{ticket:?}"), "Ticket(<redacted>)");
    }

    #[test]
    fn only_a_tickets_length_parses_and_hex_is_exact() {
        assert!(Ticket::parse(&[0; TICKET_LEN]).is_some());
        for len in [0, 1, 16, TICKET_LEN - 1, TICKET_LEN + 1] {
            assert!(Ticket::parse(&vec![0; len]).is_none(), "{len}");
        }
        assert_eq!(from_hex::<2>("a5ff"), Some([0xa5, 0xff]));
        for bad in ["a5f", "a5fff", "zz00", "+5ff"] {
            assert_eq!(from_hex::<2>(bad), None, "{bad}");
        }
    }
}
