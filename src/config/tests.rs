//! The config's own tests: the embedded default, and errors that name key and line.

use super::*;

fn check_error(text: &str, key: &str, line: Option<usize>, fragment: &str) {
    let e = Config::from_toml(text).expect_err("config should be refused");
    assert_eq!(e.key, key, "{e}");
    assert_eq!(e.line, line, "{e}");
    assert!(e.message.contains(fragment), "{e}");
}

/// The embedded, documented default file is exactly the built-in defaults.
#[test]
fn embedded_default_parses_to_defaults() {
    assert_eq!(Config::embedded_default(), Config::default());
}

/// An empty file is the defaults too (every key optional), demo app included.
#[test]
fn empty_file_is_defaults() {
    assert_eq!(Config::from_toml("").unwrap(), Config::default());
}

/// Unknown keys are refused with their name and line.
#[test]
fn unknown_key_names_key_and_line() {
    check_error("[server]\nbind = \"127.0.0.1:1\"\nshardz = 2\n", "shardz", Some(3), "unknown field");
}

/// Bad values are refused with their key and line.
#[test]
fn bad_value_names_line() {
    let e = Config::from_toml("[server]\nbind = \"nope\"\n").unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    let e = Config::from_toml("[server]\nio_driver = \"kqueue\"\n").unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    assert!(e.message.contains("unknown variant"), "{e}");
}

/// Webhook settings are checked with the key and line of the offending entry.
#[test]
fn webhook_errors_name_key_and_line() {
    let app = "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n";
    let ok = "[[apps.webhooks]]\nurl = \"http://127.0.0.1:9/\"\nformat = \"pusher\"\n";
    let bad_url = format!("{app}{ok}[[apps.webhooks]]\nformat = \"pusher\"\nurl = \"ftp://x/\"\n");
    check_error(&bad_url, "apps[0].webhooks[1].url", Some(10), "http://");
    let bad_secret =
        format!("{app}[[apps.webhooks]]\nurl = \"http://a/\"\nformat = \"standard\"\nsecret = \"whsec_AAAA\"\n");
    check_error(&bad_secret, "apps[0].webhooks[0].secret", Some(8), "bytes");
    let no_secret = format!("{app}[[apps.webhooks]]\nurl = \"http://a/\"\nformat = \"standard\"\n");
    check_error(&no_secret, "apps[0].webhooks[0].secret", None, "at least one secret");
    let bad_event = format!("{app}[[apps.webhooks]]\nurl = \"http://a/\"\nformat = \"pusher\"\nevents = [\"nope\"]\n");
    check_error(&bad_event, "apps[0].webhooks[0].events", Some(8), "unknown event");
    check_error("[webhooks]\nallowed_cidrs = [\"10.0.0.0/40\"]\n", "webhooks.allowed_cidrs", Some(2), "prefix");
    let e = Config::from_toml("[webhooks]\ndurability = \"sometimes\"\n").unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    assert!(e.message.contains("unknown variant"), "{e}");
    check_error("[webhooks]\nretry_schedule_ms = []\n", "webhooks.retry_schedule_ms", Some(2), "at least one");
    let good = format!("{app}{ok}[[apps.webhooks]]\nurl = \"https://example.com/e\"\nformat = \"standard\"\nsecret = \"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\"\nchannels = [\"orders-*\"]\n");
    assert_eq!(Config::from_toml(&good).unwrap().apps[0].webhooks.len(), 2);
}

/// A missing `ca_file` is refused at load, naming the key and line; its certificates are
/// parsed later, once, by the server's TLS connector.
#[test]
fn missing_ca_file_names_key() {
    let text = "[webhooks]\nca_file = \"/nonexistent/ringwire-ca.pem\"\n";
    check_error(text, "webhooks.ca_file", Some(2), "not a readable file");
}

/// Batches whose worst case would pass the WAL's 64 MiB record limit are refused at load,
/// naming the key and line; the defaults (and the largest standard batch with them) fit.
#[test]
fn webhook_batches_fit_a_wal_record() {
    let app = "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n";
    let pusher = "[[apps.webhooks]]\nurl = \"http://a/\"\nformat = \"pusher\"\n";
    let big_messages =
        format!("[websocket]\nmessage_bytes_max = 4194304\n[webhooks]\nbatch_events_max = 20\n{app}{pusher}");
    check_error(&big_messages, "webhooks.batch_events_max", Some(4), "record limit");
    // The same limits without a pusher-format webhook have nothing to bound.
    assert!(Config::from_toml(&format!("[websocket]\nmessage_bytes_max = 4194304\n{app}")).is_ok());
    let secret = "secret = \"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\"\n";
    let standard = |n: usize| {
        format!("[[apps.webhooks]]\nurl = \"http://a/\"\nformat = \"standard\"\n{secret}batch_events_max = {n}\n")
    };
    assert!(Config::from_toml(&format!("{app}{}", standard(1000))).is_ok());
    let big_data = format!("[http]\nbody_bytes_max = 1048576\n{app}event_data_bytes_max = 1048576\n{}", standard(100));
    check_error(&big_data, "apps[0].webhooks[0].batch_events_max", Some(12), "record limit");
    assert!(Config::from_toml(&format!("{app}{pusher}")).is_ok());
}

/// `[cluster]` values are checked with key and line: hostile URLs, names that would break
/// Redis keys, limits out of range; a good URL is accepted.
#[test]
fn cluster_errors_name_key_and_line() {
    check_error("[cluster]\nredis_url = \"http://x\"\n", "cluster.redis_url", Some(2), "redis://");
    check_error("[cluster]\nredis_url = \"redis://h:0\"\n", "cluster.redis_url", Some(2), "port");
    check_error("[cluster]\nnode_id = \"a{b}\"\n", "cluster.node_id", Some(2), "ASCII");
    check_error("[cluster]\n\nnode_id = \"\"\n", "cluster.node_id", Some(3), "1 to 64");
    check_error(&format!("[cluster]\nnode_id = \"{}\"\n", "n".repeat(65)), "cluster.node_id", Some(2), "64");
    check_error("[cluster]\nprefix = \"p{1}\"\n", "cluster.prefix", Some(2), "ASCII");
    check_error("[cluster]\nlease_ms = 10\n", "cluster.lease_ms", Some(2), "between 1000");
    check_error("[cluster]\ncommand_timeout_ms = 0\n", "cluster.command_timeout_ms", Some(2), "between 1");
    check_error("[cluster]\nreply_bytes_max = 1024\n", "cluster.reply_bytes_max", Some(2), "between 65536");
    check_error("[cluster]\nbuckets = 0\n", "cluster.buckets", Some(2), "between 1 and 4096");
    check_error("[cluster]\nbuckets = 4097\n", "cluster.buckets", Some(2), "between 1 and 4096");
    check_error("[cluster]\nsenders_max = 15\n", "cluster.senders_max", Some(2), "between 16");
    check_error("[cluster]\nconnections_refresh_ms = 99\n", "cluster.connections_refresh_ms", Some(2), "between 100");
    check_error("[cluster]\n\nconnections_refresh_ms = 60001\n", "cluster.connections_refresh_ms", Some(3), "60000");
    let e = Config::from_toml("[cluster]\nconnections_refresh_ms = -1\n").unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    // The member list of a full presence channel must fit a reply, in cluster mode only.
    let big = "[[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"s\"\npresence_members_max = 100000\n";
    let cluster = "[cluster]\nredis_url = \"redis://h\"\nreply_bytes_max = 65536\n";
    check_error(&format!("{cluster}{big}"), "cluster.reply_bytes_max", Some(3), "at least 118401024");
    assert!(Config::from_toml(big).is_ok(), "a single node has no such reply");
    let e = Config::from_toml("[cluster]\npipeline_bytes_max = -1\n").unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    check_error("[cluster]\n\nbuckets = 70000\n", "cluster.buckets", Some(3), "between 1 and 4096");
    let e = Config::from_toml("[cluster]\nbuckets = -1\n").unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    let good = "[cluster]\nnode_id = \"eu-1.a\"\nprefix = \"prod:rw\"\nlease_ms = 5000\n";
    assert_eq!(Config::from_toml(good).unwrap().cluster.node_id.as_deref(), Some("eu-1.a"));
    let url = "[cluster]\nredis_url = \"redis://:pw@redis.internal:6380/2\"\n";
    assert_eq!(Config::from_toml(url).unwrap().cluster.redis_url.as_deref(), Some("redis://:pw@redis.internal:6380/2"));
}

/// Semantic errors name the key and find its line.
#[test]
fn semantic_errors_name_key() {
    check_error("[websocket]\nframe_bytes_max = 0\n", "websocket.frame_bytes_max", Some(2), "greater than 0");
    let two_apps =
        "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n\n[[apps]]\nid = \"1\"\nkey = \"k2\"\nsecret = \"s\"\n";
    check_error(two_apps, "apps[1].id", Some(7), "duplicates apps[0].id");
    check_error("[[apps]]\nid = \"1\"\nkey = \"\"\nsecret = \"s\"\n", "apps[0].key", Some(3), "empty");
    check_error("apps = []\n", "apps", Some(1), "at least one");
}

/// `presence_debounce_ms` refuses hostile values naming the key and line; 0 (off) is allowed.
#[test]
fn presence_debounce_is_bounded() {
    let app = "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n";
    let huge = format!("{app}presence_debounce_ms = 60001\n");
    check_error(&huge, "apps[0].presence_debounce_ms", Some(5), "at most 60000");
    let negative = Config::from_toml(&format!("{app}presence_debounce_ms = -1\n")).unwrap_err();
    assert_eq!(negative.line, Some(5), "{negative}");
    let text = Config::from_toml(&format!("{app}presence_debounce_ms = \"3s\"\n")).unwrap_err();
    assert_eq!(text.line, Some(5), "{text}");
    let off = Config::from_toml(&format!("{app}presence_debounce_ms = 0\n")).unwrap();
    assert_eq!(off.apps[0].presence_debounce_ms, 0);
    assert_eq!(Config::default().apps[0].presence_debounce_ms, 3000, "Pusher's window");
}

/// The DNS settings refuse hostile values (no threads, a thread per typo'd zero, no
/// timeout) naming the key and line; a cache TTL of 0 (off) is allowed.
#[test]
fn dns_settings_are_bounded() {
    check_error("[webhooks]\ndns_threads = 0\n", "webhooks.dns_threads", Some(2), "greater than 0");
    check_error("[webhooks]\ndns_threads = 100000\n", "webhooks.dns_threads", Some(2), "at most 64");
    check_error("[webhooks]\ndns_timeout_ms = 0\n", "webhooks.dns_timeout_ms", Some(2), "greater than 0");
    assert_eq!(Config::from_toml("[webhooks]\ndns_cache_ttl_ms = 0\n").unwrap().webhooks.dns_cache_ttl_ms, 0);
}

/// A write timeout of 0 (every response would fail at once) is refused naming key and line.
#[test]
fn write_timeout_must_be_positive() {
    check_error("[http]\nwrite_timeout_ms = 0\n", "http.write_timeout_ms", Some(2), "greater than 0");
}

/// An enabled dashboard needs a printable token of at least 16 characters; a short, absent
/// or spaced token and a zero or huge list size are refused naming the key and line.
#[test]
fn dashboard_token_and_limits_are_checked() {
    check_error("[dashboard]\nenabled = true\n", "dashboard.token", Some(2), "at least 16");
    check_error("[dashboard]\nenabled = true\ntoken = \"short\"\n", "dashboard.token", Some(3), "at least 16");
    let spaced = "[dashboard]\ntoken = \"0123456789 abcdef\"\n";
    check_error(spaced, "dashboard.token", Some(2), "printable ASCII");
    check_error("[dashboard]\nchannels_shown_max = 0\n", "dashboard.channels_shown_max", Some(2), "between 1");
    check_error("[dashboard]\nchannels_shown_max = 100000\n", "dashboard.channels_shown_max", Some(2), "between 1");
    check_error("[dashboard]\ntokn = \"x\"\n", "tokn", Some(2), "unknown field");
    let ok = Config::from_toml("[dashboard]\nenabled = true\ntoken = \"0123456789abcdef\"\n").unwrap();
    assert!(ok.dashboard.enabled);
    assert!(!format!("{ok:?}").contains("0123456789abcdef"), "Debug must not print the token");
}
