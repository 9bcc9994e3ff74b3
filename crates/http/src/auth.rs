//! Access tokens on HTTP (see [`spate_broker::auth`]): with tokens configured, every request but
//! those for the pages that hold no data (the console's files, the example page, the health
//! check) must carry one, as `Authorization: Bearer <token>` or, for clients that cannot set
//! headers (a browser's EventSource and WebSocket), `access_token=<token>` in the query, which is
//! taken out of the query before the request goes on.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use std::sync::Arc;

use spate_broker::auth::{Access, Tokens};

use crate::ApiError;

/// Paths served without a token: they hold no data.
fn open_path(path: &str) -> bool {
    matches!(path, "/" | "/healthz" | "/examples/live") || path.starts_with("/console/")
}

/// The `access_token` of a query, percent-decoded, and the query without it.
fn take_query_token(query: &str) -> (Option<String>, String) {
    let mut token = None;
    let mut rest = Vec::new();
    for pair in query.split('&') {
        match pair.strip_prefix("access_token=") {
            Some(v) if token.is_none() => token = Some(percent_decode(v)),
            Some(_) => {}
            None => rest.push(pair),
        }
    }
    (token, rest.join("&"))
}

fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a read-only token may make this request: reads (a WebSocket refuses its `publish`
/// op itself), filter previews, and consuming subscriptions.
fn read_only_may(method: &Method, path: &str) -> bool {
    if method == Method::GET || method == Method::HEAD {
        return true;
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    method == Method::POST
        && matches!(
            segments.as_slice(),
            ["v1", "subscriptions", _, "pull" | "ack" | "nack" | "extend"]
                | ["v1", "topics", _, "preview"]
        )
}

fn unauthorized(given: bool) -> Response {
    let (challenge, detail) = if given {
        (
            "Bearer realm=\"spate\", error=\"invalid_token\"",
            "the access token is not one this server accepts",
        )
    } else {
        (
            "Bearer realm=\"spate\"",
            "this server needs an access token: `Authorization: Bearer <token>`, or \
             `access_token=<token>` in the query",
        )
    };
    (
        [(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        )],
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail),
    )
        .into_response()
}

/// Lets a request through when it asks for a page without data or carries an accepted token;
/// answers 401 otherwise. The router has this layer only when tokens are configured.
pub(crate) async fn require_token(
    State(tokens): State<Arc<Tokens>>,
    mut req: Request,
    next: Next,
) -> Response {
    if open_path(req.uri().path()) {
        return next.run(req).await;
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme's name is case-insensitive (RFC 9110, 11.1).
        .and_then(|v| {
            v.get(..7)
                .filter(|s| s.eq_ignore_ascii_case("bearer "))
                .map(|_| &v[7..])
        })
        .map(|t| t.trim().to_string());
    let (in_query, rest) = match req.uri().query() {
        Some(q) if q.contains("access_token=") => take_query_token(q),
        _ => (None, String::new()),
    };
    let given = bearer.or(in_query.clone());
    let Some(access) = given.as_ref().and_then(|t| tokens.access(t.as_bytes())) else {
        return unauthorized(given.is_some());
    };
    if access == Access::ReadOnly && !read_only_may(req.method(), req.uri().path()) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this access token is read-only: it may read and consume, not write or change \
             what the server holds",
        )
        .into_response();
    }
    req.extensions_mut().insert(access);
    if in_query.is_some() {
        // Handlers refuse query parameters they do not know: the token is not theirs.
        let path = req.uri().path();
        let rebuilt = if rest.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{rest}")
        };
        if let Ok(uri) = rebuilt.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_token_is_decoded_and_taken_out() {
        assert_eq!(
            take_query_token("from=earliest&access_token=a%2Bb%3Dc&types=x.*"),
            (
                Some("a+b=c".to_string()),
                "from=earliest&types=x.*".to_string()
            )
        );
        assert_eq!(
            take_query_token("access_token=t1&access_token=t2"),
            (Some("t1".to_string()), String::new())
        );
        assert_eq!(take_query_token("a=1"), (None, "a=1".to_string()));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
