//! The payload of a [`Frame::Connection`](super::Frame::Connection): a
//! [`ConnectionInfo`], which the relay writes first on each inner connection.
//!
//! | field        | encoding                                                     |
//! |--------------|--------------------------------------------------------------|
//! | `id`         | `u64`                                                        |
//! | `client`     | address: `family: u8` (4 or 6), the IP (4 or 16 bytes), `port: u16` |
//! | `relay_addr` | address, as `client`                                         |
//! | `edge`       | `u8`: 1 TLS, 2 raw TCP                                       |
//! | TLS only     | `server_name: str16` (1 to 255 bytes), `alpn: bytes16` (0 to 255 bytes, empty = none) |

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::BufMut;

use super::field::{put_bytes16, Reader};
use super::{FrameError, FrameKind};
use crate::connection::{ConnectionInfo, Edge};

/// Largest payload of a connection frame, in bytes: what the agent reads at most.
pub const MAX_CONNECTION_LEN: usize = 8 + 2 * ADDRESS_LEN_MAX + 1 + 2 + 255 + 2 + 255;

/// Encoded size of the larger address (IPv6).
const ADDRESS_LEN_MAX: usize = 1 + 16 + 2;
/// The `family` bytes.
const IPV4: u8 = 4;
const IPV6: u8 = 6;
/// The `edge` bytes.
const TLS: u8 = 1;
const TCP: u8 = 2;
/// Longest server name (a DNS name is at most 253 bytes) or ALPN protocol id.
const MAX_NAME_LEN: usize = 255;

pub(super) fn parse(r: &mut Reader<'_>) -> Result<ConnectionInfo, FrameError> {
    let id = r.u64("id")?;
    let client = address(r, "client")?;
    let relay_addr = address(r, "relay_addr")?;
    let edge = match r.u8("edge")? {
        TLS => {
            let server_name = r.str16("server_name")?;
            let alpn = r.bytes16("alpn")?;
            if server_name.is_empty() {
                return Err(reserved("server_name"));
            }
            if server_name.len() > MAX_NAME_LEN {
                return Err(too_long("server_name", server_name.len()));
            }
            if alpn.len() > MAX_NAME_LEN {
                return Err(too_long("alpn", alpn.len()));
            }
            Edge::Tls {
                server_name,
                alpn: (!alpn.is_empty()).then(|| alpn.to_vec()),
            }
        }
        TCP => Edge::Tcp,
        _ => return Err(reserved("edge")),
    };
    let info = ConnectionInfo::new(id, client, relay_addr, edge);
    // Only canonical addresses are accepted, so that every frame re-encodes to its bytes.
    if info.client() != client || info.relay_addr() != relay_addr {
        return Err(reserved("address"));
    }
    Ok(info)
}

pub(super) fn payload_len(info: &ConnectionInfo) -> usize {
    let address_len = |address: SocketAddr| if address.is_ipv4() { 1 + 4 + 2 } else { 1 + 16 + 2 };
    let edge_len = match info.edge() {
        Edge::Tls { server_name, alpn } => {
            2 + server_name.len() + 2 + alpn.as_ref().map_or(0, Vec::len)
        }
        _ => 0,
    };
    8 + address_len(info.client()) + address_len(info.relay_addr()) + 1 + edge_len
}

pub(super) fn validate(info: &ConnectionInfo) -> Result<(), FrameError> {
    if let Edge::Tls { server_name, alpn } = info.edge() {
        if server_name.is_empty() {
            return Err(reserved("server_name"));
        }
        if server_name.len() > MAX_NAME_LEN {
            return Err(too_long("server_name", server_name.len()));
        }
        match alpn {
            Some(alpn) if alpn.is_empty() => return Err(reserved("alpn")),
            Some(alpn) if alpn.len() > MAX_NAME_LEN => return Err(too_long("alpn", alpn.len())),
            _ => {}
        }
    }
    Ok(())
}

pub(super) fn emit(info: &ConnectionInfo, dst: &mut impl BufMut) {
    dst.put_u64(info.id());
    put_address(dst, info.client());
    put_address(dst, info.relay_addr());
    match info.edge() {
        Edge::Tls { server_name, alpn } => {
            dst.put_u8(TLS);
            put_bytes16(dst, server_name.as_bytes());
            put_bytes16(dst, alpn.as_deref().unwrap_or_default());
        }
        _ => dst.put_u8(TCP),
    }
}

fn address(r: &mut Reader<'_>, field: &'static str) -> Result<SocketAddr, FrameError> {
    let ip = match r.u8(field)? {
        IPV4 => IpAddr::V4(Ipv4Addr::from(r.u32(field)?)),
        IPV6 => IpAddr::V6(Ipv6Addr::from(r.u128(field)?)),
        _ => return Err(reserved(field)),
    };
    Ok(SocketAddr::new(ip, r.u16(field)?))
}

fn put_address(dst: &mut impl BufMut, address: SocketAddr) {
    match address.ip() {
        IpAddr::V4(ip) => {
            dst.put_u8(IPV4);
            dst.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            dst.put_u8(IPV6);
            dst.put_slice(&ip.octets());
        }
    }
    dst.put_u16(address.port());
}

fn reserved(field: &'static str) -> FrameError {
    FrameError::ReservedValue {
        kind: FrameKind::Connection,
        field,
    }
}

fn too_long(field: &'static str, len: usize) -> FrameError {
    FrameError::FieldTooLong {
        kind: FrameKind::Connection,
        field,
        len,
        max: MAX_NAME_LEN,
    }
}
