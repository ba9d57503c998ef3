//! `cluster.redis_url`: `redis://[[username]:password@]host[:port][/db]`.
//!
//! A leaf (no other ringwire module), so that `config` validates with the parser `cluster`
//! connects with and neither imports the other's direction. Parsing is pure; resolving a host name is a blocking call (`RedisUrl::resolve`) that belongs
//! at start-up or on a helper thread, never on a shard thread.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

use percent_encoding::percent_decode_str;

/// Redis's default port.
pub const DEFAULT_PORT: u16 = 6379;

/// A parsed Redis URL. `Debug` never prints the password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// ACL user for `AUTH`, if any (Redis 6+).
    pub username: Option<String>,
    /// Password for `AUTH`, if any.
    pub password: Option<String>,
    /// Logical database for `SELECT` (pub/sub ignores it; keys do not).
    pub db: u32,
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .finish()
    }
}

impl RedisUrl {
    /// Parses a URL; the error says what is wrong, for a config error naming the key.
    pub fn parse(text: &str) -> Result<RedisUrl, String> {
        if text.starts_with("rediss://") {
            return Err("TLS to Redis (rediss://) is not supported yet; use redis://".into());
        }
        let rest = text.strip_prefix("redis://").ok_or("must start with redis://")?;
        if rest.contains(['?', '#']) {
            return Err("query strings and fragments are not supported".into());
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, host_port) = match authority.rsplit_once('@') {
            Some((userinfo, host_port)) => (Some(userinfo), host_port),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(userinfo) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (non_empty(decode(user)?), non_empty(decode(password)?))
            }
        };
        if username.is_some() && password.is_none() {
            return Err("a username needs a password (redis://user:password@host)".into());
        }
        let (host, port) = split_host_port(host_port)?;
        let db = match path {
            "" => 0,
            db => db.parse::<u32>().map_err(|_| format!("database `{db}` is not a number"))?,
        };
        Ok(RedisUrl { host, port, username, password, db })
    }

    /// Resolves the host to its first address. Blocking (DNS): never call it on a shard thread.
    pub fn resolve(&self) -> std::io::Result<SocketAddr> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{} has no address", self.host)))
    }
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

fn decode(text: &str) -> Result<String, String> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| "the user info is not UTF-8 after percent-decoding".into())
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(text: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or("expected :port after ]")?)),
        }
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(port) => match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("port `{port}` is not a port number")),
            Ok(port) => port,
        },
    };
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Host, port, username, password, database.
    type Parts<'a> = (&'a str, u16, Option<&'a str>, Option<&'a str>, u32);

    fn check(text: &str, expected: Result<Parts, &str>) {
        let parsed = RedisUrl::parse(text);
        match expected {
            Ok((host, port, username, password, db)) => {
                let url = parsed.unwrap_or_else(|e| panic!("{text}: {e}"));
                assert_eq!(url.host, host, "{text}");
                assert_eq!(url.port, port, "{text}");
                assert_eq!(url.username.as_deref(), username, "{text}");
                assert_eq!(url.password.as_deref(), password, "{text}");
                assert_eq!(url.db, db, "{text}");
            }
            Err(fragment) => {
                let error = parsed.expect_err(text);
                assert!(error.contains(fragment), "{text}: {error}");
            }
        }
    }

    /// Well-formed URLs give host, port, credentials and database; defaults fill the rest.
    #[test]
    fn parses_urls() {
        check("redis://127.0.0.1", Ok(("127.0.0.1", 6379, None, None, 0)));
        check("redis://redis.internal:6380/2", Ok(("redis.internal", 6380, None, None, 2)));
        check("redis://:s3cret@h", Ok(("h", 6379, None, Some("s3cret"), 0)));
        check("redis://app:p%40ss@h:1/", Ok(("h", 1, Some("app"), Some("p@ss"), 0)));
        check("redis://[::1]:7000", Ok(("::1", 7000, None, None, 0)));
        check("redis://[::1]", Ok(("::1", 6379, None, None, 0)));
    }

    /// Hostile or unsupported URLs are refused with a reason, never a panic.
    #[test]
    fn refuses_bad_urls() {
        check("http://h", Err("redis://"));
        check("rediss://h", Err("TLS"));
        check("redis://", Err("host is empty"));
        check("redis://h:0", Err("not a port"));
        check("redis://h:99999", Err("not a port"));
        check("redis://h:x", Err("not a port"));
        check("redis://h/db", Err("not a number"));
        check("redis://h?timeout=1", Err("query"));
        check("redis://[::1", Err("unclosed"));
        check("redis://[::1]x", Err(":port"));
        check("redis://user@h", Err("needs a password"));
        check("redis://:%ff@h", Err("UTF-8"));
    }

    /// The password never shows up in logs.
    #[test]
    fn debug_hides_the_password() {
        let url = RedisUrl::parse("redis://:hunter2@h").unwrap();
        assert!(!format!("{url:?}").contains("hunter2"));
    }
}
