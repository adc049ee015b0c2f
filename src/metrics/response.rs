//! The answers of the metrics endpoint, sans-IO: which page a request gets from a
//! [`Site`], and the bytes of the response.

use super::request::{BadRequest, Method, Request};

/// What the endpoint serves: the metrics text and whether the process is ready.
pub(crate) trait Site: Send + Sync + 'static {
    /// The metrics, in the OpenMetrics text format.
    fn metrics(&self) -> String;
    /// Whether the process is ready for traffic (`/readyz`).
    fn ready(&self) -> bool;
}

/// The media type of the OpenMetrics text format, which Prometheus asks for first.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The media type of every other page.
const TEXT: &str = "text/plain; charset=utf-8";

/// One response, always the last of its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub(crate) status: u16,
    content_type: &'static str,
    body: String,
    /// Whether the body is left out (an answer to `HEAD`).
    head_only: bool,
}

impl Response {
    fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
            head_only: false,
        }
    }

    /// The response to a request (or to a request head that could not be read).
    pub(crate) fn to(request: Result<Request, BadRequest>, site: &dyn Site) -> Response {
        let request = match request {
            Ok(request) => request,
            Err(BadRequest::Malformed) => return Response::new(400, TEXT, "bad request\n"),
            Err(BadRequest::TooLarge) => {
                return Response::new(431, TEXT, "request header fields too large\n")
            }
        };
        let page = match request.path.as_str() {
            "/metrics" => Response::new(200, OPENMETRICS, site.metrics()),
            "/healthz" => Response::new(200, TEXT, "ok\n"),
            "/readyz" if site.ready() => Response::new(200, TEXT, "ready\n"),
            "/readyz" => Response::new(503, TEXT, "not ready\n"),
            _ => return Response::new(404, TEXT, "not found: try /metrics, /healthz or /readyz\n"),
        };
        match request.method {
            Method::Get => page,
            Method::Head => Response {
                head_only: true,
                ..page
            },
            Method::Other => Response::new(405, TEXT, "method not allowed: GET or HEAD\n"),
        }
    }

    /// The response's bytes: status line, headers (`Connection: close` always), body.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            head += "Allow: GET, HEAD\r\n";
        }
        head += "\r\n";
        let mut bytes = head.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }

    /// The answer to a client that sent no whole request head in time.
    pub(crate) fn timed_out() -> Response {
        Response::new(408, TEXT, "request timeout\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed {
        ready: bool,
    }

    impl Site for Fixed {
        fn metrics(&self) -> String {
            "# EOF\n".into()
        }
        fn ready(&self) -> bool {
            self.ready
        }
    }

    fn answer(method: Method, path: &str, ready: bool) -> Response {
        let request = Request {
            method,
            path: path.into(),
        };
        Response::to(Ok(request), &Fixed { ready })
    }

    fn text(response: &Response) -> String {
        String::from_utf8(response.to_bytes()).unwrap()
    }

    #[test]
    fn each_page_has_its_status() {
        assert_eq!(answer(Method::Get, "/metrics", false).status, 200);
        assert_eq!(answer(Method::Get, "/healthz", false).status, 200);
        assert_eq!(answer(Method::Get, "/readyz", true).status, 200);
        assert_eq!(answer(Method::Get, "/readyz", false).status, 503);
        assert_eq!(answer(Method::Get, "/", true).status, 404);
        assert_eq!(answer(Method::Get, "/metrics/", true).status, 404);
        assert_eq!(answer(Method::Other, "/metrics", true).status, 405);
        assert_eq!(answer(Method::Other, "/nowhere", true).status, 404);
        let site = Fixed { ready: true };
        assert_eq!(Response::to(Err(BadRequest::Malformed), &site).status, 400);
        assert_eq!(Response::to(Err(BadRequest::TooLarge), &site).status, 431);
    }

    #[test]
    fn a_response_closes_its_connection_and_counts_its_body() {
        let metrics = text(&answer(Method::Get, "/metrics", true));
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.contains("\r\nConnection: close\r\n"));
        assert!(metrics.contains("\r\nContent-Type: application/openmetrics-text;"));
        assert!(metrics.ends_with(
            "\r\nContent-Length: 6\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n# EOF\n"
        ));
        let head = text(&answer(Method::Head, "/metrics", true));
        assert!(head.ends_with(
            "Content-Length: 6\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
        ));
        let refused = text(&answer(Method::Other, "/metrics", true));
        assert!(refused.contains("\r\nAllow: GET, HEAD\r\n"), "{refused}");
    }
}
