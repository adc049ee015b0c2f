//! PROXY protocol headers (HAProxy's, versions 1 and 2) that tell a local service who
//! each public client is, written before the client's first byte when a tunnel asks
//! for them ([`ForwardOptions::proxy_protocol`](super::ForwardOptions::proxy_protocol)).
//! Encoded with the `ppp` crate.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ppp::v2::{Builder, Command, Protocol, Type, Version};

use crate::connection::{ConnectionInfo, Edge};

/// Which PROXY protocol header a tunnel's local service gets first on each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyProtocol {
    /// The text header: `PROXY TCP4 <client> <relay> <client port> <relay port>\r\n`.
    V1,
    /// The binary header, with TLVs for the TLS server name (`PP2_TYPE_AUTHORITY`), the
    /// negotiated ALPN (`PP2_TYPE_ALPN`) and the relay's connection id as 8 bytes,
    /// big-endian (`PP2_TYPE_UNIQUE_ID`).
    V2,
}

impl ProxyProtocol {
    /// `v1` or `v2`, as the command line and the Python package spell them.
    pub fn parse(text: &str) -> Option<ProxyProtocol> {
        match text.to_ascii_lowercase().as_str() {
            "v1" | "1" => Some(ProxyProtocol::V1),
            "v2" | "2" => Some(ProxyProtocol::V2),
            _ => None,
        }
    }

    /// The header for the connection `info`: from its client to the relay address the
    /// client reached.
    pub fn header(self, info: &ConnectionInfo) -> Vec<u8> {
        let (client, relay) = same_family(info.client(), info.relay_addr());
        match self {
            ProxyProtocol::V1 => ppp::v1::Addresses::from((client, relay))
                .to_string()
                .into_bytes(),
            ProxyProtocol::V2 => v2(info, client, relay),
        }
    }
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        })
    }
}

fn v2(info: &ConnectionInfo, client: SocketAddr, relay: SocketAddr) -> Vec<u8> {
    let mut tlvs: Vec<(Type, &[u8])> = Vec::new();
    if let Edge::Tls { server_name, alpn } = info.edge() {
        if let Some(alpn) = alpn {
            tlvs.push((Type::ALPN, alpn));
        }
        tlvs.push((Type::Authority, server_name.as_bytes()));
    }
    let id = info.id().to_be_bytes();
    tlvs.push((Type::UniqueId, &id));
    let mut header = Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        (client, relay),
    );
    for (kind, value) in tlvs {
        // Writing to a Vec fails only past the header's u16 length, and the TLVs here
        // are at most 255 + 255 + 8 bytes.
        header = header.write_tlv(kind, value).expect("small TLVs fit");
    }
    header.build().expect("small TLVs fit")
}

/// The two addresses in one family, as a header needs them: an IPv4 one beside an
/// IPv6 one becomes IPv4-mapped IPv6.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    if a.is_ipv4() == b.is_ipv4() {
        return (a, b);
    }
    let v6 = |address: SocketAddr| match address.ip() {
        IpAddr::V4(ip) => SocketAddr::new(ip.to_ipv6_mapped().into(), address.port()),
        IpAddr::V6(_) => address,
    };
    (v6(a), v6(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_info(client: &str, relay: &str) -> ConnectionInfo {
        ConnectionInfo::new(
            0x0102_0304_0506_0708,
            client.parse().unwrap(),
            relay.parse().unwrap(),
            Edge::Tls {
                server_name: "abc.portferry.localhost".into(),
                alpn: Some(b"h2".to_vec()),
            },
        )
    }

    /// The v2 signature, from the specification (section 2.2).
    const SIGNATURE: [u8; 12] = [
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
    ];

    #[test]
    fn v1_tcp4_and_tcp6() {
        let info = tls_info("192.0.2.7:4000", "127.0.0.1:8443");
        assert_eq!(
            ProxyProtocol::V1.header(&info),
            b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 8443\r\n"
        );
        let info = ConnectionInfo::new(
            1,
            "[2001:db8::7]:4000".parse().unwrap(),
            "[::1]:20001".parse().unwrap(),
            Edge::Tcp,
        );
        assert_eq!(
            ProxyProtocol::V1.header(&info),
            b"PROXY TCP6 2001:db8::7 ::1 4000 20001\r\n"
        );
    }

    #[test]
    fn v1_mixed_families_are_ipv6() {
        let info = tls_info("[2001:db8::7]:4000", "127.0.0.1:8443");
        assert_eq!(
            ProxyProtocol::V1.header(&info),
            b"PROXY TCP6 2001:db8::7 ::ffff:127.0.0.1 4000 8443\r\n"
        );
    }

    #[test]
    fn v2_tcp4_with_alpn_authority_and_unique_id() {
        let info = tls_info("192.0.2.7:4000", "127.0.0.1:8443");
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[
            0x21, // version 2, PROXY
            0x11, // AF_INET, STREAM
            0x00, 0x00, // length of what follows, set below
        ]);
        let mut body = vec![
            192, 0, 2, 7, // source
            127, 0, 0, 1, // destination
            0x0f, 0xa0, // source port 4000
            0x20, 0xfb, // destination port 8443
            0x01, 0x00, 0x02, b'h', b'2', // PP2_TYPE_ALPN
            0x02, 0x00, 0x17, // PP2_TYPE_AUTHORITY, 23 bytes
        ];
        body.extend_from_slice(b"abc.portferry.localhost");
        body.extend_from_slice(&[0x05, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8]); // UNIQUE_ID
        let len = u16::try_from(body.len()).unwrap().to_be_bytes();
        expected[14..16].copy_from_slice(&len);
        expected.extend_from_slice(&body);
        assert_eq!(ProxyProtocol::V2.header(&info), expected);
    }

    #[test]
    fn v2_tcp6_raw_tcp_has_only_the_unique_id() {
        let info = ConnectionInfo::new(
            9,
            "[2001:db8::7]:4000".parse().unwrap(),
            "[::1]:20001".parse().unwrap(),
            Edge::Tcp,
        );
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x21, 0x00, 36 + 11]);
        expected.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend_from_slice(&[0x0f, 0xa0, 0x4e, 0x21]);
        expected.extend_from_slice(&[0x05, 0x00, 0x08, 0, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(ProxyProtocol::V2.header(&info), expected);
    }

    #[test]
    fn v2_parses_back_with_ppp() {
        let info = tls_info("[2001:db8::7]:4000", "[::1]:8443");
        let header = ProxyProtocol::V2.header(&info);
        let parsed = ppp::v2::Header::try_from(&header[..]).unwrap();
        assert_eq!(parsed.len(), header.len());
        let tlvs: Vec<(u8, Vec<u8>)> = parsed
            .tlvs()
            .map(|tlv| {
                let tlv = tlv.unwrap();
                (tlv.kind, tlv.value.to_vec())
            })
            .collect();
        assert_eq!(
            tlvs,
            [
                (0x01, b"h2".to_vec()),
                (0x02, b"abc.portferry.localhost".to_vec()),
                (0x05, 0x0102_0304_0506_0708u64.to_be_bytes().to_vec()),
            ]
        );
    }

    #[test]
    fn names_parse() {
        assert_eq!(ProxyProtocol::parse("v1"), Some(ProxyProtocol::V1));
        assert_eq!(ProxyProtocol::parse("V2"), Some(ProxyProtocol::V2));
        assert_eq!(ProxyProtocol::parse("v3"), None);
    }
}
