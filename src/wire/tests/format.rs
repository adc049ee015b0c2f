//! How frames and errors print: secrets redacted, codes named.

use bytes::Bytes;

use super::*;
use crate::Limit;

#[test]
fn debug_redacts_token() {
    let hello = Hello {
        version: 1,
        token: "hunter2".into(),
        resume: Bytes::new(),
    };
    let debug = format!("{:?}", Frame::Hello(hello));
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("<redacted>"), "{debug}");
}

#[test]
fn debug_redacts_resume_tickets() {
    let ticket = Bytes::from_static(&[0xab; crate::wire::TICKET_LEN]);
    let frames = [
        Frame::Hello(Hello {
            version: 1,
            token: String::new(),
            resume: ticket.clone(),
        }),
        Frame::Welcome(Welcome {
            version: 1,
            ticket: ticket.clone(),
        }),
    ];
    for frame in frames {
        let debug = format!("{frame:?}");
        assert!(!debug.contains("171") && !debug.contains("ab"), "{debug}");
        assert!(debug.contains("<redacted 48 bytes>"), "{debug}");
    }
}

#[test]
fn error_code_names() {
    assert_eq!(format!("{:?}", ErrorCode::PROTOCOL), "ErrorCode::PROTOCOL");
    assert_eq!(format!("{:?}", ErrorCode(42)), "ErrorCode(42)");
    assert_eq!(ErrorCode::PORT_IN_USE.to_string(), "PORT_IN_USE (3)");
    assert_eq!(ErrorCode(42).to_string(), "42");
}

#[test]
fn limit_codes_name_their_limit() {
    let leases = ErrorCode::limit_reached(Limit::LeasesPerToken);
    assert_eq!(leases, ErrorCode(0x0108), "numbers never change");
    assert_eq!(leases.limit(), Some(Limit::LeasesPerToken));
    assert_eq!(leases.to_string(), "LIMIT_REACHED max_leases_per_token (264)");
    assert_eq!(
        format!("{leases:?}"),
        "ErrorCode::limit_reached(LeasesPerToken)"
    );
    // An older relay's code, one this build has no name for, and codes of other kinds.
    assert_eq!(ErrorCode::LIMIT_REACHED.limit(), Some(Limit::Unknown(0)));
    assert_eq!(ErrorCode(0x01ff).limit(), Some(Limit::Unknown(255)));
    for other in [ErrorCode::TOO_SOON, ErrorCode(0x0100), ErrorCode(0x0200)] {
        assert_eq!(other.limit(), None, "{other:?}");
    }
}

#[test]
fn error_display() {
    let err = FrameError::Truncated {
        kind: FrameKind::Ping,
        field: "nonce",
    };
    assert_eq!(err.to_string(), "Ping frame cut short in field `nonce`");
    assert_eq!(
        FrameError::UnknownKind(0x09).to_string(),
        "unknown frame kind 0x09"
    );
}
