//! PROXY protocol headers (v1 text, v2 binary) in front of connections from trusted
//! balancers: a balancer that terminates the client's TCP connection tells the relay
//! who the client is in a header before the client's first byte.
//!
//! Only a peer inside a configured block ([`RelayConfig::accept_proxy_protocol_from`])
//! is read for a header, and then must send one; from anyone else a header is just
//! bytes (it is never looked for, so no client can claim another's address). The
//! header is read without reading past it (peeked, then exactly its bytes consumed),
//! and bounded: a v1 header is at most [`MAX_V1_LEN`] bytes, a v2 header at most
//! [`MAX_V2_LEN`] (the protocol allows 16 + 65,535; balancers send addresses and a few
//! TLVs). The parsing itself is `ppp`'s; [`header_len`] and [`addresses`] are sans-IO.
//!
//! [`RelayConfig::accept_proxy_protocol_from`]: super::RelayConfig::accept_proxy_protocol_from

use std::net::{IpAddr, SocketAddr};

use ppp::v2;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::cidr::Cidr;

/// The longest v1 header, CRLF included (the protocol's own bound).
pub(crate) const MAX_V1_LEN: usize = 107;

/// The longest v2 header accepted: the 16-byte fixed part and up to 4 KiB of addresses
/// and TLVs. A longer one is refused.
pub(crate) const MAX_V2_LEN: usize = 16 + 4096;

/// The 12 bytes every v2 header starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What every v1 header starts with.
const V1_PREFIX: &[u8] = b"PROXY ";

/// Who a connection is from, and which address of ours (or of the balancer in front)
/// it reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientAddr {
    /// The client: the PROXY header's source, or the socket's peer.
    pub(crate) client: SocketAddr,
    /// What the client connected to: the header's destination, or the socket's local
    /// address.
    pub(crate) reached: SocketAddr,
}

/// Why a trusted peer's connection has no usable header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderError {
    /// The first bytes match neither version's signature.
    NotProxy,
    /// Longer than [`MAX_V1_LEN`] / [`MAX_V2_LEN`].
    TooLong,
    /// The signature is right but the rest is not a header (`ppp`'s reason).
    Malformed(String),
    /// The connection ended (or failed) before the whole header.
    Truncated,
    /// The whole header did not come by the deadline.
    TimedOut,
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotProxy => write!(f, "no PROXY protocol header"),
            Self::TooLong => write!(
                f,
                "a PROXY header longer than {MAX_V1_LEN} (v1) or {MAX_V2_LEN} (v2) bytes"
            ),
            Self::Malformed(reason) => write!(f, "a malformed PROXY header: {reason}"),
            Self::Truncated => write!(f, "the connection ended inside its PROXY header"),
            Self::TimedOut => write!(f, "no whole PROXY header by the handshake deadline"),
        }
    }
}

/// Whether connections from `ip` start with a PROXY header (it is in a `trusted` block).
pub(crate) fn trusts(trusted: &[Cidr], ip: IpAddr) -> bool {
    trusted.iter().any(|block| block.contains(ip))
}

/// The client of `tcp`: from a `trusted` peer, what its PROXY header says (the socket's
/// own addresses for a `LOCAL` header — a balancer's health check — or an `UNKNOWN` /
/// unspecified one), read by `deadline` and consumed; from anyone else, the socket's
/// addresses, at once and reading nothing.
pub(crate) async fn client_of(
    tcp: &mut TcpStream,
    trusted: &[Cidr],
    deadline: Instant,
) -> Result<ClientAddr, HeaderError> {
    let socket = of_socket(tcp).ok_or(HeaderError::Truncated)?;
    if !trusts(trusted, socket.client.ip()) {
        return Ok(socket);
    }
    match timeout_at(deadline, read_header(tcp)).await {
        Ok(Ok(header)) => Ok(header.unwrap_or(socket)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(HeaderError::TimedOut),
    }
}

/// The socket's own addresses: its peer, and where it reached us (`None` once it is
/// no longer connected).
pub(crate) fn of_socket(tcp: &TcpStream) -> Option<ClientAddr> {
    Some(ClientAddr {
        client: tcp.peer_addr().ok()?,
        reached: tcp.local_addr().ok()?,
    })
}

/// Reads the PROXY header at the start of `tcp`, and not a byte past it: what is
/// available is peeked, and only bytes known to be the header's are consumed. The
/// addresses it carries (`None`: use the socket's). Not bounded in time.
async fn read_header(tcp: &mut TcpStream) -> Result<Option<ClientAddr>, HeaderError> {
    let mut header = Vec::new();
    let mut peeked = vec![0; MAX_V2_LEN];
    loop {
        // `header_len` refuses a header before it outgrows the buffer.
        let room = MAX_V2_LEN - header.len();
        let available = match tcp.peek(&mut peeked[..room]).await {
            Ok(0) | Err(_) => return Err(HeaderError::Truncated),
            Ok(n) => n,
        };
        let consumed = header.len();
        header.extend_from_slice(&peeked[..available]);
        let whole = header_len(&header)?;
        header.truncate(consumed);
        // Whole: take just its bytes. Not yet: all the bytes seen are the header's.
        let take = whole.map_or(available, |len| len - consumed);
        tcp.read_exact(&mut peeked[..take])
            .await
            .map_err(|_| HeaderError::Truncated)?;
        header.extend_from_slice(&peeked[..take]);
        if whole.is_some() {
            return addresses(&header);
        }
    }
}

/// The length of the PROXY header `bytes` start with: `Some` once it is whole, `None`
/// while more bytes may complete it, an error once they cannot.
pub(crate) fn header_len(bytes: &[u8]) -> Result<Option<usize>, HeaderError> {
    let starts = |signature: &[u8]| {
        let n = bytes.len().min(signature.len());
        bytes[..n] == signature[..n]
    };
    if starts(V2_SIGNATURE) {
        let Some(length) = bytes.get(14..16) else {
            return Ok(None);
        };
        let len = 16 + usize::from(u16::from_be_bytes([length[0], length[1]]));
        if len > MAX_V2_LEN {
            return Err(HeaderError::TooLong);
        }
        return Ok((bytes.len() >= len).then_some(len));
    }
    if starts(V1_PREFIX) {
        let seen = &bytes[..bytes.len().min(MAX_V1_LEN)];
        if let Some(cr) = seen.windows(2).position(|pair| pair == b"\r\n") {
            return Ok(Some(cr + 2));
        }
        return if bytes.len() >= MAX_V1_LEN {
            Err(HeaderError::TooLong)
        } else {
            Ok(None)
        };
    }
    Err(HeaderError::NotProxy)
}

/// The addresses a whole header (exactly its bytes) carries: `None` for a `LOCAL`
/// command, a v1 `UNKNOWN` or an unspecified / Unix address family, which the
/// protocol says to take the connection's own addresses for.
pub(crate) fn addresses(header: &[u8]) -> Result<Option<ClientAddr>, HeaderError> {
    let pair = |client: SocketAddr, reached: SocketAddr| Some(ClientAddr { client, reached });
    if header.starts_with(V1_PREFIX) {
        let parsed = ppp::v1::Header::try_from(header)
            .map_err(|error| HeaderError::Malformed(error.to_string()))?;
        return Ok(match parsed.addresses {
            ppp::v1::Addresses::Tcp4(ip) => pair(
                (ip.source_address, ip.source_port).into(),
                (ip.destination_address, ip.destination_port).into(),
            ),
            ppp::v1::Addresses::Tcp6(ip) => pair(
                (ip.source_address, ip.source_port).into(),
                (ip.destination_address, ip.destination_port).into(),
            ),
            ppp::v1::Addresses::Unknown => None,
        });
    }
    let parsed =
        v2::Header::try_from(header).map_err(|error| HeaderError::Malformed(error.to_string()))?;
    if parsed.command == v2::Command::Local {
        return Ok(None);
    }
    match (parsed.protocol, parsed.addresses) {
        (v2::Protocol::Datagram, _) => Err(HeaderError::Malformed(
            "a datagram (UDP) header in front of a TCP connection".into(),
        )),
        (v2::Protocol::Stream, v2::Addresses::IPv4(ip)) => Ok(pair(
            (ip.source_address, ip.source_port).into(),
            (ip.destination_address, ip.destination_port).into(),
        )),
        (v2::Protocol::Stream, v2::Addresses::IPv6(ip)) => Ok(pair(
            (ip.source_address, ip.source_port).into(),
            (ip.destination_address, ip.destination_port).into(),
        )),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// `192.0.2.1:50000` → `198.51.100.7:443`, as v2 PROXY over TCP/IPv4, with two TLVs
    /// (ALPN `h2`, NOOP `abc`).
    const V2_TCP4: &[u8] = &[
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, 0x11, 0x00, 0x17, // v2 PROXY, INET STREAM, 23 bytes follow
        192, 0, 2, 1, 198, 51, 100, 7, 0xC3, 0x50, 0x01, 0xBB, // addresses, ports
        0x01, 0x00, 0x02, b'h', b'2', // ALPN TLV
        0x04, 0x00, 0x03, b'a', b'b', b'c', // NOOP TLV
    ];

    /// `[2001:db8::1]:50000` → `[2001:db8::2]:443`, as v2 PROXY over TCP/IPv6, with a
    /// NOOP TLV.
    const V2_TCP6: &[u8] = &[
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, 0x21, 0x00, 0x28, // v2 PROXY, INET6 STREAM, 40 bytes follow
        0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // source
        0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, // destination
        0xC3, 0x50, 0x01, 0xBB, // ports
        0x04, 0x00, 0x01, 0x00, // NOOP TLV
    ];

    /// A v2 LOCAL header (a balancer's health check), no addresses.
    const V2_LOCAL: &[u8] = &[
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x20, 0x00, 0x00,
        0x00,
    ];

    const V1_TCP4: &[u8] = b"PROXY TCP4 192.0.2.1 198.51.100.7 50000 443\r\n";
    const V1_TCP6: &[u8] = b"PROXY TCP6 2001:db8::1 2001:db8::2 50000 443\r\n";

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn v4_pair() -> Option<ClientAddr> {
        Some(ClientAddr {
            client: addr("192.0.2.1:50000"),
            reached: addr("198.51.100.7:443"),
        })
    }

    fn v6_pair() -> Option<ClientAddr> {
        Some(ClientAddr {
            client: addr("[2001:db8::1]:50000"),
            reached: addr("[2001:db8::2]:443"),
        })
    }

    #[test]
    fn whole_headers_give_their_length_and_addresses() {
        for (header, expected) in [
            (V1_TCP4, v4_pair()),
            (V1_TCP6, v6_pair()),
            (V2_TCP4, v4_pair()),
            (V2_TCP6, v6_pair()),
            (V2_LOCAL, None),
            (&b"PROXY UNKNOWN\r\n"[..], None),
        ] {
            let mut followed = header.to_vec();
            followed.extend_from_slice(b"\x16\x03\x01 the ClientHello");
            assert_eq!(header_len(&followed), Ok(Some(header.len())), "{header:?}");
            assert_eq!(addresses(header), Ok(expected), "{header:?}");
        }
    }

    #[test]
    fn every_prefix_of_a_header_is_incomplete() {
        for header in [V1_TCP4, V1_TCP6, V2_TCP4, V2_TCP6, V2_LOCAL] {
            for cut in 1..header.len() {
                assert_eq!(
                    header_len(&header[..cut]),
                    Ok(None),
                    "{header:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn garbage_and_oversized_headers_are_refused() {
        // A TLS ClientHello, an HTTP request: no header.
        for garbage in [
            &b"\x16\x03\x01\x02\x00\x01"[..],
            b"GET / HTTP/1.1\r\n",
            b"PROXYTCP4",
        ] {
            assert_eq!(
                header_len(garbage),
                Err(HeaderError::NotProxy),
                "{garbage:?}"
            );
        }
        // v1 without its CRLF within 107 bytes.
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(MAX_V1_LEN, b'1');
        assert_eq!(header_len(&long), Err(HeaderError::TooLong));
        // v2 announcing more than the 4 KiB accepted (the protocol allows 64 KiB).
        let mut big = V2_LOCAL.to_vec();
        big[14..16].copy_from_slice(&(4097u16).to_be_bytes());
        assert_eq!(header_len(&big), Err(HeaderError::TooLong));
        big[14..16].copy_from_slice(&(4096u16).to_be_bytes());
        assert_eq!(header_len(&big), Ok(None), "4 KiB is accepted");
    }

    #[test]
    fn malformed_headers_are_refused() {
        for header in [
            &b"PROXY TCP4 192.0.2.1 nowhere 50000 443\r\n"[..],
            b"PROXY TCP4 192.0.2.1 198.51.100.7 70000 443\r\n",
            b"PROXY SCTP 192.0.2.1 198.51.100.7 1 2\r\n",
        ] {
            assert!(
                matches!(addresses(header), Err(HeaderError::Malformed(_))),
                "{header:?}"
            );
        }
        // v2 with a version of 3; v2 over UDP.
        let mut version = V2_TCP4.to_vec();
        version[12] = 0x31;
        assert!(matches!(
            addresses(&version),
            Err(HeaderError::Malformed(_))
        ));
        let mut udp = V2_TCP4.to_vec();
        udp[13] = 0x12;
        assert!(matches!(addresses(&udp), Err(HeaderError::Malformed(_))));
    }

    /// A loopback connection: the accepted side, and the side that connected.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (listener.accept().await.unwrap().0, peer)
    }

    fn loopback() -> Vec<Cidr> {
        vec!["127.0.0.0/8".parse().unwrap()]
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// Everything `tcp` still holds until its peer closes.
    async fn rest(tcp: &mut TcpStream) -> Vec<u8> {
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest).await.unwrap();
        rest
    }

    #[tokio::test]
    async fn a_trusted_peers_header_is_consumed_and_nothing_after_it() {
        for header in [V1_TCP4, V2_TCP6] {
            let (mut accepted, mut peer) = pair().await;
            // In two writes: the reader may see the header in pieces.
            peer.write_all(&header[..7]).await.unwrap();
            let mut after = header[7..].to_vec();
            after.extend_from_slice(b"client bytes");
            peer.write_all(&after).await.unwrap();
            drop(peer);
            let client = client_of(&mut accepted, &loopback(), soon()).await;
            let expected = if header == V1_TCP4 {
                v4_pair()
            } else {
                v6_pair()
            };
            assert_eq!(client.ok(), expected);
            assert_eq!(rest(&mut accepted).await, b"client bytes");
        }
    }

    #[tokio::test]
    async fn a_local_header_stands_for_the_socket_itself() {
        let (mut accepted, mut peer) = pair().await;
        peer.write_all(V2_LOCAL).await.unwrap();
        let client = client_of(&mut accepted, &loopback(), soon()).await;
        assert_eq!(client.unwrap().client, peer.local_addr().unwrap());
    }

    #[tokio::test]
    async fn an_untrusted_peers_bytes_are_not_read() {
        let (mut accepted, mut peer) = pair().await;
        peer.write_all(V1_TCP4).await.unwrap();
        drop(peer);
        let elsewhere = vec!["10.0.0.0/8".parse().unwrap()];
        let client = client_of(&mut accepted, &elsewhere, soon()).await.unwrap();
        assert!(client.client.ip().is_loopback());
        assert_eq!(client.reached, accepted.local_addr().unwrap());
        assert_eq!(rest(&mut accepted).await, V1_TCP4, "a header is just bytes");
    }

    #[tokio::test]
    async fn a_trusted_peer_without_a_header_is_refused() {
        let (mut accepted, mut peer) = pair().await;
        peer.write_all(b"\x16\x03\x01\x02\x00").await.unwrap();
        let refused = client_of(&mut accepted, &loopback(), soon()).await;
        assert_eq!(refused, Err(HeaderError::NotProxy));

        let (mut accepted, mut peer) = pair().await;
        peer.write_all(&V2_TCP4[..20]).await.unwrap();
        drop(peer);
        let refused = client_of(&mut accepted, &loopback(), soon()).await;
        assert_eq!(refused, Err(HeaderError::Truncated));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_trusted_peer_is_refused_at_the_deadline() {
        let (mut accepted, _peer) = pair().await;
        let refused = client_of(&mut accepted, &loopback(), soon()).await;
        assert_eq!(refused, Err(HeaderError::TimedOut));
    }
}
