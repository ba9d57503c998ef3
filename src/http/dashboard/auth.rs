//! The dashboard's credential: the configured token, presented as `Authorization: Bearer`,
//! or the session cookie the login form sets.
//!
//! Owns the comparison (constant time, through HMAC) and the cookie's value. The cookie holds
//! `HMAC(process key, token)`, not the token: a leaked cookie does not reveal the token and
//! stops working when the process restarts (its key is random per process). Never touches
//! sockets or shard state.

use std::sync::OnceLock;

use ring::hmac;
use ring::rand::SystemRandom;

use crate::http::parse::RequestHead;

/// The session cookie's name.
pub const COOKIE_NAME: &str = "ringwire_dashboard";

/// What a request presented, judged against the configured token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// A matching Bearer token or session cookie.
    Valid,
    /// Nothing presented.
    Missing,
    /// A Bearer token that does not match (refused and counted).
    Wrong,
    /// A session cookie that does not match (e.g. from before a restart): refused, not counted.
    Stale,
}

/// The per-process key behind every comparison and session cookie.
fn key() -> &'static hmac::Key {
    static KEY: OnceLock<hmac::Key> = OnceLock::new();
    KEY.get_or_init(|| {
        hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new()).expect("the system's random source works")
    })
}

/// Whether `presented` is the token, in time independent of where they differ and of the
/// token's length: both sides are HMACed first and the tags compared in constant time.
pub fn token_matches(presented: &[u8], token: &str) -> bool {
    let expected = hmac::sign(key(), token.as_bytes());
    !token.is_empty() && hmac::verify(key(), presented, expected.as_ref()).is_ok()
}

/// The message whose HMAC is the session cookie (distinct from the token's own HMAC).
fn session_message(token: &str) -> Vec<u8> {
    let mut message = b"ringwire dashboard session\0".to_vec();
    message.extend_from_slice(token.as_bytes());
    message
}

/// The session cookie's value for `token`: hex of its HMAC under the process key.
pub fn session_value(token: &str) -> String {
    hex::encode(hmac::sign(key(), &session_message(token)).as_ref())
}

/// Whether a cookie value is the session of `token` (constant-time tag comparison).
fn session_matches(value: &str, token: &str) -> bool {
    match hex::decode(value) {
        Ok(tag) => !token.is_empty() && hmac::verify(key(), &session_message(token), &tag).is_ok(),
        Err(_) => false,
    }
}

/// The value of cookie `name` in any `Cookie` header (RFC 6265 §5.4: `name=value; …`).
fn cookie<'a>(head: &'a RequestHead, name: &str) -> Option<&'a str> {
    let headers = head.headers.iter().filter(|(n, _)| n == "cookie");
    let pairs = headers.filter_map(|(_, v)| std::str::from_utf8(v).ok()).flat_map(|v| v.split(';'));
    pairs.filter_map(|pair| pair.trim().split_once('=')).find(|(n, _)| *n == name).map(|(_, v)| v.trim())
}

/// Judges a request: a Bearer header wins over a cookie (it is what scripts send).
pub fn check(head: &RequestHead, token: &str) -> Credential {
    if let Some(value) = head.header("authorization") {
        // RFC 6750 §2.1: `Authorization: Bearer <token>`; the scheme is case-insensitive.
        let presented = value.get(..7).filter(|s| s.eq_ignore_ascii_case(b"bearer ")).map(|_| value[7..].trim_ascii());
        return match presented {
            Some(presented) if token_matches(presented, token) => Credential::Valid,
            _ => Credential::Wrong,
        };
    }
    match cookie(head, COOKIE_NAME) {
        Some(value) if session_matches(value, token) => Credential::Valid,
        Some(_) => Credential::Stale,
        None => Credential::Missing,
    }
}

/// The `token` field of a URL-encoded login form body (`token=…&…`), decoded.
pub fn form_token(body: &[u8]) -> Option<String> {
    let body = std::str::from_utf8(body).ok()?;
    let (_, value) = body.split('&').filter_map(|pair| pair.split_once('=')).find(|(name, _)| *name == "token")?;
    // HTML form encoding writes spaces as `+` before percent-encoding the rest.
    let value = value.replace('+', " ");
    Some(percent_encoding::percent_decode_str(&value).decode_utf8_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef-operator";

    fn head(headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            method: http::Method::GET,
            path: "/dashboard".into(),
            query: String::new(),
            version_minor: 1,
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect(),
            content_length: 0,
            keep_alive: true,
            head_len: 0,
        }
    }

    fn check_head(headers: &[(&str, &str)], expected: Credential) {
        assert_eq!(check(&head(headers), TOKEN), expected, "{headers:?}");
    }

    /// Bearer tokens, cookies and their absence are told apart; prefixes, case and an empty
    /// configured token never match.
    #[test]
    fn credentials_are_judged() {
        let session = format!("{COOKIE_NAME}={}", session_value(TOKEN));
        check_head(&[], Credential::Missing);
        check_head(&[("authorization", &format!("Bearer {TOKEN}"))], Credential::Valid);
        check_head(&[("authorization", &format!("bearer {TOKEN}"))], Credential::Valid);
        check_head(&[("authorization", "Bearer 0123456789abcdef")], Credential::Wrong);
        check_head(&[("authorization", &format!("Bearer {TOKEN}x"))], Credential::Wrong);
        check_head(&[("authorization", &format!("Basic {TOKEN}"))], Credential::Wrong);
        check_head(&[("authorization", "Bear")], Credential::Wrong);
        check_head(&[("cookie", &format!("a=b; {session}; c=d"))], Credential::Valid);
        check_head(&[("cookie", "x=1"), ("cookie", &session)], Credential::Valid);
        check_head(&[("cookie", &format!("{COOKIE_NAME}={TOKEN}"))], Credential::Stale);
        check_head(&[("cookie", &format!("{COOKIE_NAME}=zz"))], Credential::Stale);
        check_head(&[("cookie", "other=1")], Credential::Missing);
        // A wrong Bearer is refused even beside a good cookie: the header is what was meant.
        check_head(&[("authorization", "Bearer nope"), ("cookie", &session)], Credential::Wrong);
        assert!(!token_matches(b"", ""));
        assert_ne!(session_value(TOKEN), session_value("another-token-of-16"));
    }

    /// The form field is decoded as browsers encode it; a body without it yields nothing.
    #[test]
    fn form_token_decodes() {
        assert_eq!(form_token(b"token=a%2Bb+c&x=1").as_deref(), Some("a+b c"));
        assert_eq!(form_token(b"x=1&token=abc").as_deref(), Some("abc"));
        assert_eq!(form_token(b"x=1"), None);
        assert_eq!(form_token(b"\xff\xfe"), None);
    }
}
