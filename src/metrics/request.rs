//! The request head of the metrics endpoint, sans-IO: what an HTTP/1.x request asks
//! for, parsed by `httparse` from at most [`MAX_HEAD`] bytes.

/// The most bytes a request head (request line and headers) may take. A head not
/// complete within them is refused with 431.
pub(crate) const MAX_HEAD: usize = 8 * 1024;

/// The most header lines a request head may have; more is refused with 431.
const MAX_HEADERS: usize = 32;

/// The method of a request, as far as the endpoint cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// `GET`: the page.
    Get,
    /// `HEAD`: the page's head only.
    Head,
    /// Anything else: refused with 405.
    Other,
}

/// A complete, well-formed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) method: Method,
    /// The path asked for, without its query string.
    pub(crate) path: String,
}

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadRequest {
    /// Not HTTP/1.x as RFC 9112 writes it: 400.
    Malformed,
    /// Longer than [`MAX_HEAD`] bytes, or more than 32 header lines: 431.
    TooLarge,
}

/// Parses the request head at the start of `received` (the bytes read so far):
/// `Ok(None)` while it is incomplete and may still fit [`MAX_HEAD`] bytes. A body after
/// the head is never looked at.
pub(crate) fn parse_head(received: &[u8]) -> Result<Option<Request>, BadRequest> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(received) {
        Ok(httparse::Status::Complete(length)) if length <= MAX_HEAD => {}
        Ok(httparse::Status::Complete(_)) => return Err(BadRequest::TooLarge),
        Ok(httparse::Status::Partial) if received.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Err(BadRequest::TooLarge)
        }
        Err(_) => return Err(BadRequest::Malformed),
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(BadRequest::Malformed);
    };
    // Only the origin form names a path (not `*`, an authority or an absolute URL).
    if !target.starts_with('/') {
        return Err(BadRequest::Malformed);
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    Ok(Some(Request {
        method,
        path: path.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Result<Option<Request>, BadRequest> {
        Ok(Some(Request {
            method: Method::Get,
            path: path.into(),
        }))
    }

    #[test]
    fn a_scrape_is_parsed_and_its_query_dropped() {
        let head = b"GET /metrics?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9090\r\nAccept: */*\r\n\r\n";
        assert_eq!(parse_head(head), get("/metrics"));
        assert_eq!(parse_head(b"GET /readyz HTTP/1.0\r\n\r\n"), get("/readyz"));
        let head = parse_head(b"HEAD /healthz HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.method, Method::Head);
        let post = parse_head(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(post.unwrap().unwrap().method, Method::Other);
    }

    #[test]
    fn an_incomplete_head_waits_for_more_bytes() {
        let head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 0..head.len() {
            assert_eq!(parse_head(&head[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn garbage_and_other_protocols_are_malformed() {
        for head in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET * HTTP/1.1\r\n\r\n",
            b"GET http://example.com/metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /me trics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse_head(head), Err(BadRequest::Malformed), "{head:?}");
        }
    }

    #[test]
    fn a_head_beyond_its_bounds_is_too_large() {
        let mut long = b"GET /metrics HTTP/1.1\r\nX-Padding: ".to_vec();
        long.resize(MAX_HEAD, b'a');
        assert_eq!(parse_head(&long), Err(BadRequest::TooLarge));
        // Just within the bound, it is still read.
        let mut fits = b"GET /metrics HTTP/1.1\r\nX-Padding: ".to_vec();
        fits.resize(MAX_HEAD - 4, b'a');
        fits.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_head(&fits), get("/metrics"));
        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&many), Err(BadRequest::TooLarge));
    }
}
