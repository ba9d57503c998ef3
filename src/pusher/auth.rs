//! Pusher HTTP API request signing, auth_version 1.0 (reference §1.11).
//!
//! `auth_signature = hex(HMAC-SHA256(secret, "METHOD\nPATH\nQUERY"))`, where QUERY is every
//! parameter but `auth_signature`, keys lower-cased, sorted, joined `k=v` with `&`, values not
//! escaped. Owns the checks a signed request must pass; knows nothing of routes or sockets.
//!
//! Invariant: the signed string and the parameters the server acts on say the same thing.
//! Keys are lower-cased once, when parsed, so signing and lookup see the same key; a key may
//! appear once; and no decoded key holds `&` or `=` and no decoded value holds `&`, so the
//! signed string splits back into exactly the parameters parsed (an escaped `%26` cannot fold
//! two signed parameters into one value and hide the second).

use md5::{Digest, Md5};
use ring::hmac;

/// How far `auth_timestamp` may be from now, either way.
pub const TIMESTAMP_WINDOW_S: u64 = 600;

/// Why a signed request was refused (HTTP 401 with this reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError(pub String);

/// Decoded query parameters, in the order sent.
pub type Params = Vec<(String, String)>;

/// Parses a raw query string, percent-decoding keys and values and lower-casing keys (the
/// signature covers keys lower-cased, so that is the key the request means).
pub fn parse_query(query: &str) -> Params {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key).to_ascii_lowercase(), decode(value))
        })
        .collect()
}

/// Refuses parameters the signed string cannot tell apart from others (see the module doc).
fn check_unambiguous(params: &Params) -> Result<(), AuthError> {
    if let Some((key, _)) = params.iter().find(|(k, v)| k.contains(['&', '=']) || v.contains('&')) {
        return Err(AuthError(format!(
            "query parameter {key:?} holds a reserved character (an escaped & or =) that the signature cannot delimit"
        )));
    }
    // Sorted, so a hostile query of thousands of keys costs n log n, not n².
    let mut keys: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    match keys.windows(2).find(|pair| pair[0] == pair[1]) {
        Some(pair) => Err(AuthError(format!("query parameter {:?} appears more than once", pair[0]))),
        None => Ok(()),
    }
}

fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned()
}

/// The first value of `key`.
pub fn param<'a>(params: &'a Params, key: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// A signed request to check.
pub struct SignedRequest<'a> {
    /// HTTP method, upper case.
    pub method: &'a str,
    /// Path as sent.
    pub path: &'a str,
    /// Decoded query parameters.
    pub params: &'a Params,
    /// Raw body.
    pub body: &'a [u8],
}

/// Verifies a request against an app's key and secret at `now_unix` seconds.
pub fn verify(request: &SignedRequest<'_>, app_key: &str, secret: &hmac::Key, now_unix: u64) -> Result<(), AuthError> {
    let params = request.params;
    let fail = |reason: &str| Err(AuthError(reason.to_string()));
    check_unambiguous(params)?;
    match param(params, "auth_key") {
        None => return fail("missing auth_key"),
        Some(key) if key != app_key => return fail("unknown auth_key"),
        Some(_) => {}
    }
    match param(params, "auth_version") {
        Some("1.0") => {}
        _ => return fail("auth_version must be 1.0"),
    }
    let Some(timestamp) = param(params, "auth_timestamp").and_then(|t| t.parse::<u64>().ok()) else {
        return fail("missing or invalid auth_timestamp");
    };
    if timestamp.abs_diff(now_unix) > TIMESTAMP_WINDOW_S {
        return Err(AuthError(format!(
            "auth_timestamp {timestamp} is more than {TIMESTAMP_WINDOW_S} s from the server time {now_unix}; check the clock"
        )));
    }
    // body_md5 is required with a body; without one it may still be sent (the Python SDK sends
    // the MD5 of the empty body on every GET) and must then match too.
    match param(params, "body_md5") {
        Some(md5) if !md5.eq_ignore_ascii_case(&hex::encode(Md5::digest(request.body))) => {
            return fail("body_md5 does not match the body")
        }
        None if !request.body.is_empty() => return fail("missing body_md5"),
        _ => {}
    }
    let Some(signature) = param(params, "auth_signature") else {
        return fail("missing auth_signature");
    };
    let Ok(signature) = hex::decode(signature) else {
        return fail("auth_signature is not hex");
    };
    let to_sign = string_to_sign(request.method, request.path, params);
    // ring's verify compares in constant time.
    hmac::verify(secret, to_sign.as_bytes(), &signature)
        .map_err(|_| AuthError("invalid signature: check the app secret and that the request is signed as sent".into()))
}

/// `METHOD\nPATH\nk=v&...` over every parameter but auth_signature.
pub fn string_to_sign(method: &str, path: &str, params: &Params) -> String {
    let mut pairs: Vec<(String, &str)> = params
        .iter()
        .filter(|(k, _)| k != "auth_signature")
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    pairs.sort();
    let query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{method}\n{path}\n{}", query.join("&"))
}

/// Signs a request the way the server SDKs do; used by tests and the load generator.
pub fn sign(method: &str, path: &str, params: &Params, secret: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hex::encode(hmac::sign(&key, string_to_sign(method, path, params).as_bytes()).as_ref())
}

/// The full query string of a signed request: params plus body_md5 and auth_signature.
pub fn signed_query(
    method: &str,
    path: &str,
    app_key: &str,
    secret: &str,
    body: &[u8],
    timestamp: u64,
    extra: &[(&str, &str)],
) -> String {
    let mut params: Params = vec![
        ("auth_key".into(), app_key.into()),
        ("auth_timestamp".into(), timestamp.to_string()),
        ("auth_version".into(), "1.0".into()),
    ];
    if !body.is_empty() {
        params.push(("body_md5".into(), hex::encode(Md5::digest(body))));
    }
    params.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let signature = sign(method, path, &params, secret);
    params.push(("auth_signature".into(), signature));
    params.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "278d425bdf160c739803";
    const SECRET: &str = "7ad3773142a6692b25b8";
    const BODY: &[u8] = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;

    fn secret() -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes())
    }

    fn reference_query() -> String {
        "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f&auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c".into()
    }

    fn check(query: &str, body: &[u8], now: u64, expected: Result<(), &str>) {
        let params = parse_query(query);
        let request = SignedRequest { method: "POST", path: "/apps/3/events", params: &params, body };
        let got = verify(&request, KEY, &secret(), now);
        match expected {
            Ok(()) => assert_eq!(got, Ok(())),
            Err(fragment) => assert!(got.as_ref().is_err_and(|e| e.0.contains(fragment)), "{got:?}"),
        }
    }

    /// Pusher's documented REST signing vector verifies, and its parts are as documented.
    #[test]
    fn reference_vector() {
        assert_eq!(hex::encode(Md5::digest(BODY)), "ec365a775a4cd0599faeb73354201b6f");
        let params = parse_query(&reference_query());
        assert_eq!(
            string_to_sign("POST", "/apps/3/events", &params),
            "POST\n/apps/3/events\nauth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f"
        );
        check(&reference_query(), BODY, 1353088179, Ok(()));
        check(&reference_query(), BODY, 1353088179 + 600, Ok(()));
    }

    /// Replays outside the 600 s window, tampering and missing parts are refused.
    #[test]
    fn refusals() {
        check(&reference_query(), BODY, 1353088179 + 601, Err("more than 600 s"));
        check(&reference_query(), BODY, 1353088179 - 601, Err("more than 600 s"));
        check(&reference_query(), b"{}", 1353088179, Err("body_md5"));
        check(&reference_query().replace("da4548", "da4549"), BODY, 1353088179, Err("invalid signature"));
        check(&reference_query().replace("auth_key=278d", "auth_key=999d"), BODY, 1353088179, Err("unknown auth_key"));
        check(
            &reference_query().replace("auth_version=1.0", "auth_version=2.0"),
            BODY,
            1353088179,
            Err("auth_version"),
        );
        check("auth_key=278d425bdf160c739803&auth_timestamp=1&auth_version=1.0", b"", 1, Err("missing auth_signature"));
        check(
            "auth_key=278d425bdf160c739803&auth_timestamp=1&auth_version=1.0&auth_signature=zz",
            b"",
            1,
            Err("not hex"),
        );
        check(
            "auth_key=278d425bdf160c739803&auth_timestamp=1&auth_version=1.0&auth_signature=00",
            b"x",
            1,
            Err("missing body_md5"),
        );
    }

    /// No parameter can be neutralised by a change that keeps the signed string: a key in
    /// another case is the same parameter (signed lower-cased, so looked up lower-cased), and
    /// an escaped `&` cannot fold two signed parameters into one value.
    #[test]
    fn signed_string_and_parameters_agree() {
        let signed =
            signed_query("GET", "/apps/3/channels", KEY, SECRET, b"", 1000, &[("filter_by_prefix", "private-")]);
        let shouted = signed.replace("filter_by_prefix=", "FILTER_BY_PREFIX=");
        let params = parse_query(&shouted);
        let request = SignedRequest { method: "GET", path: "/apps/3/channels", params: &params, body: b"" };
        assert_eq!(verify(&request, KEY, &secret(), 1000), Ok(()));
        assert_eq!(param(&params, "filter_by_prefix"), Some("private-"), "the filter still applies");

        // auth_version=1.0 and body_md5 sort next to each other: folding them into one value
        // keeps the same signed string but would hide body_md5.
        let query = reference_query().replace("auth_version=1.0&body_md5=", "auth_version=1.0%26body_md5%3D");
        check(&query, BODY, 1353088179, Err("reserved character"));
        let folded = signed_query("GET", "/apps/3/channels", KEY, SECRET, b"", 1000, &[("a", "1"), ("auth_key", KEY)]);
        let folded = folded.replace("a=1&auth_key=", "a=1%26auth_key%3D");
        let params = parse_query(&folded);
        let request = SignedRequest { method: "GET", path: "/apps/3/channels", params: &params, body: b"" };
        assert!(verify(&request, KEY, &secret(), 1000).is_err_and(|e| e.0.contains("reserved character")));

        // One parameter twice (in any case) is ambiguous: refused, whatever its signature.
        let twice = format!("{signed}&Filter_By_Prefix=presence-");
        let params = parse_query(&twice);
        let request = SignedRequest { method: "GET", path: "/apps/3/channels", params: &params, body: b"" };
        assert!(verify(&request, KEY, &secret(), 1000).is_err_and(|e| e.0.contains("more than once")));
    }

    /// Values sent escaped (as the Go SDK does) are signed decoded, as the reference says.
    #[test]
    fn escaped_values_verify_decoded() {
        let signed = signed_query("GET", "/apps/3/channels", KEY, SECRET, b"", 1000, &[("info", "user_count,x y")]);
        let escaped = signed.replace("info=user_count,x y", "info=user_count%2Cx%20y");
        let params = parse_query(&escaped);
        let request = SignedRequest { method: "GET", path: "/apps/3/channels", params: &params, body: b"" };
        assert_eq!(verify(&request, KEY, &secret(), 1000), Ok(()));
        assert_eq!(param(&params, "info"), Some("user_count,x y"));
    }

    /// What `signed_query` produces verifies, including an empty-body MD5 on GET.
    #[test]
    fn signed_query_round_trip() {
        let query = signed_query("POST", "/apps/3/events", KEY, SECRET, BODY, 1000, &[]);
        check(&query, BODY, 1000, Ok(()));
        let with_empty_md5 = signed_query(
            "POST",
            "/apps/3/events",
            KEY,
            SECRET,
            b"",
            1000,
            &[("body_md5", "d41d8cd98f00b204e9800998ecf8427e")],
        );
        check(&with_empty_md5, b"", 1000, Ok(()));
    }
}
