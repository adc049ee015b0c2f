//! Address blocks in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`, or one address),
//! for naming the balancers a relay trusts.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A block of IP addresses: a network address and a prefix length. An IPv4 block also
/// holds the IPv4-mapped IPv6 form of its addresses (`::ffff:10.0.0.1`), which is how
/// a dual-stack socket reports an IPv4 peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why text is not a [`Cidr`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CidrError {
    /// The part before the `/` is not an IP address.
    Address(String),
    /// The prefix length is not a number within the address's bits.
    Prefix {
        /// The text after the `/`.
        prefix: String,
        /// The address's bits: 32 or 128.
        bits: u8,
    },
    /// Bits are set past the prefix: the address is not the block's first one.
    HostBits {
        /// The text as given.
        given: String,
        /// The block's network address.
        network: IpAddr,
        /// The prefix length.
        prefix: u8,
    },
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address(text) => write!(f, "{text:?} is not an IP address"),
            Self::Prefix { prefix, bits } => {
                write!(f, "{prefix:?} is not a prefix length of 0 to {bits}")
            }
            Self::HostBits {
                given,
                network,
                prefix,
            } => write!(
                f,
                "{given} has bits set past the /{prefix}: the block is {network}/{prefix}"
            ),
        }
    }
}

impl std::error::Error for CidrError {}

impl Cidr {
    /// The block of `prefix` leading bits of `network`; an error if `prefix` exceeds
    /// the address's bits or `network` has bits set past it.
    pub fn new(network: IpAddr, prefix: u8) -> Result<Cidr, CidrError> {
        let given = format!("{network}/{prefix}");
        let bits = bits_of(network);
        if prefix > bits {
            return Err(CidrError::Prefix {
                prefix: prefix.to_string(),
                bits,
            });
        }
        let cidr = Cidr { network, prefix };
        let masked = cidr.masked(network);
        if masked != network {
            return Err(CidrError::HostBits {
                given,
                network: masked,
                prefix,
            });
        }
        Ok(cidr)
    }

    /// The block's first address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The number of leading bits every address of the block shares.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the block (an IPv4-mapped IPv6 address counts as its IPv4
    /// address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        bits_of(ip) == bits_of(self.network) && self.masked(ip) == self.network
    }

    /// `ip` with the bits past the prefix cleared (`ip` of the block's family).
    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        }
    }
}

/// Bits of an address of `ip`'s family.
fn bits_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `address/prefix`, or an address alone (a block of that one address).
    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| CidrError::Address(address.to_owned()))?;
        let bits = bits_of(network);
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|&length| length <= bits && !prefix.starts_with('+'))
                .ok_or_else(|| CidrError::Prefix {
                    prefix: prefix.to_owned(),
                    bits,
                })?,
        };
        Cidr::new(network, prefix).map_err(|error| match error {
            CidrError::HostBits {
                network, prefix, ..
            } => CidrError::HostBits {
                given: text.to_owned(),
                network,
                prefix,
            },
            other => other,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_blocks_and_single_addresses_and_prints_them_back() {
        for text in [
            "10.0.0.0/8",
            "127.0.0.1/32",
            "0.0.0.0/0",
            "2001:db8::/32",
            "::1/128",
        ] {
            assert_eq!(cidr(text).to_string(), text);
        }
        assert_eq!(cidr("192.0.2.7"), cidr("192.0.2.7/32"));
        assert_eq!(cidr("::1"), cidr("::1/128"));
        assert_eq!(cidr("10.0.0.0/8").prefix(), 8);
        assert_eq!(cidr("10.0.0.0/8").network(), ip("10.0.0.0"));
    }

    #[test]
    fn refuses_bad_addresses_prefixes_and_host_bits() {
        let refused = |text: &str| text.parse::<Cidr>().unwrap_err();
        assert_eq!(refused("10.0.0/8"), CidrError::Address("10.0.0".into()));
        assert_eq!(refused(""), CidrError::Address(String::new()));
        for (text, prefix, bits) in [
            ("10.0.0.0/33", "33", 32),
            ("10.0.0.0/", "", 32),
            ("10.0.0.0/+8", "+8", 32),
            ("10.0.0.0/x", "x", 32),
            ("::/129", "129", 128),
        ] {
            let prefix = prefix.to_owned();
            assert_eq!(refused(text), CidrError::Prefix { prefix, bits }, "{text}");
        }
        let error = refused("10.1.2.3/8");
        assert_eq!(
            error.to_string(),
            "10.1.2.3/8 has bits set past the /8: the block is 10.0.0.0/8"
        );
        assert!(matches!(
            refused("2001:db8::1/32"),
            CidrError::HostBits { .. }
        ));
    }

    #[test]
    fn contains_the_block_and_nothing_else() {
        let block = cidr("192.168.16.0/20");
        for inside in ["192.168.16.0", "192.168.31.255", "192.168.20.7"] {
            assert!(block.contains(ip(inside)), "{inside}");
        }
        for outside in ["192.168.15.255", "192.168.32.0", "10.0.0.1", "::1"] {
            assert!(!block.contains(ip(outside)), "{outside}");
        }
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        let v6 = cidr("2001:db8:a::/48");
        assert!(v6.contains(ip("2001:db8:a:ffff::1")));
        assert!(!v6.contains(ip("2001:db8:b::1")));
        assert!(cidr("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!cidr("127.0.0.1").contains(ip("127.0.0.2")));
    }

    #[test]
    fn an_ipv4_block_holds_the_mapped_form_of_its_addresses() {
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(!cidr("10.0.0.0/8").contains(ip("::ffff:11.1.2.3")));
    }
}
