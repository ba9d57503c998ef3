//! Users online cluster-wide, for watchlists (docs/cluster.md, "Presence, occupancy, users:
//! keys and scripts"): the `online` / `offline` scripts that decide inside Redis whether a
//! node-level sign-in is the user's first connection anywhere, or a node-level sign-out the
//! last, and publish kind 8 / 9 to the user's bucket as the script sender (shard `0xFFFF`).
//!
//! Keys: `{prefix}:a:{app}:online` (HASH user → nodes holding a signed-in connection) and
//! `{prefix}:a:{app}:online:{node}` (SET of the users this node holds, `node` being
//! `{node_id}/{incarnation as 16 hex digits}`), so a node's contributions can be taken back
//! one by one (by the node at a reconnect, by a reaper when it died) and each script is
//! idempotent: a `SADD` or `SREM` that changes nothing decides nothing.
//!
//! Sans-IO: builders return the commands (`EVALSHA` of the scripts `cluster::scripts` loads at
//! every connect), readers take `Reply`s.

use super::bucket;
use super::commands::Command;
use super::link::Reply;
use super::message::{self, Header, Kind, MessageError, Sender, SCRIPT_SHARD};
use super::scripts;
use super::NodeIdentity;
use crate::pusher::message as pusher_message;

/// `online` (loaded with the other scripts by `cluster::scripts`, whose `publish` it calls).
/// KEYS: the app's online hash, this node's set, script incarnation, the bucket's `:seq`. ARGV: user, bucket channel, message, incarnation candidate. Returns 1 when the
/// user came online cluster-wide (kind 8 published), else 0.
pub(super) const ONLINE: &str = r#"
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[1], ARGV[1], 1) > 1 then return 0 end
publish(KEYS[3], KEYS[4], ARGV[2], ARGV[3], ARGV[4])
return 1
"#;

/// `offline`. KEYS and ARGV as `online`. Returns 1 when the user went offline cluster-wide
/// (kind 9 published), else 0. The reaper runs it for a dead node's users.
pub(super) const OFFLINE: &str = r#"
if redis.call('SREM', KEYS[2], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) > 0 then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
publish(KEYS[3], KEYS[4], ARGV[2], ARGV[3], ARGV[4])
return 1
"#;

/// `{prefix}:a:{app_id}:online`: user → number of nodes holding a signed-in connection.
pub fn online_key(prefix: &str, app_id: &str) -> String {
    format!("{prefix}:a:{app_id}:online")
}

/// `{prefix}:a:{app_id}:online:{node_id}/{incarnation}`: the users the node named `holder`
/// (`scripts::node_name`) holds.
pub fn node_key(prefix: &str, app_id: &str, holder: &str) -> String {
    format!("{prefix}:a:{app_id}:online:{holder}")
}

/// `{prefix}:script_incarnation`: the script sender's id (docs/cluster.md, "Scripts are
/// senders of their own").
pub fn script_incarnation_key(prefix: &str) -> String {
    format!("{prefix}:script_incarnation")
}

/// What the node asks Redis to decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The user's first signed-in connection on this node arrived.
    Online,
    /// The user's last signed-in connection on this node ended.
    Offline,
}

/// Everything a script call needs from the node.
pub struct Caller<'a> {
    /// `cluster.prefix`.
    pub prefix: &'a str,
    /// `cluster.buckets`.
    pub buckets: u16,
    /// This node (the caller, named in the message).
    pub node: &'a NodeIdentity,
    /// The node whose contribution changes (`scripts::node_name`): this one, or a dead one
    /// being reaped.
    pub holder: &'a str,
    /// Proposed script incarnation if Redis keeps none yet: random, never 0.
    pub candidate: u64,
}

/// The `EVALSHA` of `online` or `offline` for `user_id` of `app_id`. The message's sender and
/// sequence are placeholders the script replaces. Fails only for a user id the message format
/// refuses (no connection can sign in with one).
pub fn call(caller: &Caller<'_>, app_id: &str, user_id: &str, transition: Transition) -> Result<Command, MessageError> {
    let scripts = scripts::scripts();
    let (script, kind, name) = match transition {
        Transition::Online => (&scripts.online, Kind::UserOnline, "online"),
        Transition::Offline => (&scripts.offline, Kind::UserOffline, "offline"),
    };
    let header = Header {
        kind,
        sender: Sender { incarnation: 1, shard: SCRIPT_SHARD },
        sequence: 1,
        node_id: &caller.node.node_id,
        app_id,
        channel: "",
        user_id,
        exclude: None,
    };
    let frame = pusher_message::watchlist_event(name, &[user_id]);
    let mut payload = Vec::with_capacity(64 + frame.len());
    message::encode(&header, &frame, &mut payload)?;
    let number = bucket::of_user(user_id, caller.buckets);
    let (mut channel, mut sequence_key) = (String::new(), String::new());
    bucket::channel_name(caller.prefix, app_id, number, &mut channel);
    bucket::sequence_key(caller.prefix, app_id, number, &mut sequence_key);
    let (online, holder) = (online_key(caller.prefix, app_id), node_key(caller.prefix, app_id, caller.holder));
    let keys = [online.as_str(), &holder, &script_incarnation_key(caller.prefix), &sequence_key];
    let candidate = format!("{:016x}", caller.candidate.max(1));
    let args: [&[u8]; 4] = [user_id.as_bytes(), channel.as_bytes(), &payload, candidate.as_bytes()];
    Ok(script.call(&keys, &args))
}

/// `HEXISTS` of the user in the app's online hash: whether the user is online anywhere.
pub fn is_online(prefix: &str, app_id: &str, user_id: &str) -> Command {
    vec![b"HEXISTS".to_vec(), online_key(prefix, app_id).into_bytes(), user_id.as_bytes().to_vec()]
}

/// Reads the reply to `call` (whether a transition was decided) or to `is_online`; an error
/// reply or anything else is a reason.
pub fn decided(reply: &Reply) -> Result<bool, String> {
    match reply {
        Reply::Integer(0) => Ok(false),
        Reply::Integer(1) => Ok(true),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(node: &NodeIdentity) -> Caller<'_> {
        Caller { prefix: "rw", buckets: 64, node, holder: "n1/0000000000001234", candidate: 0xab }
    }

    /// The call names the app's keys, the user's bucket and its `:seq`, and carries a kind 8/9
    /// message with the watchlist frame and placeholder numbers; a user id the format refuses is
    /// an error value.
    #[test]
    fn script_calls() {
        let node = NodeIdentity { node_id: "n1".into(), incarnation: 0x1234 };
        let call = call(&caller(&node), "app", "alice", Transition::Offline).unwrap();
        let text = |i: usize| String::from_utf8(call[i].to_vec()).unwrap();
        let number = bucket::of_user("alice", 64);
        assert_eq!(text(0), "EVALSHA");
        assert_eq!(text(1), scripts::scripts().offline.sha);
        assert_eq!(text(2), "4");
        assert_eq!(
            (3..8).map(text).collect::<Vec<_>>(),
            [
                "rw:a:app:online".to_string(),
                "rw:a:app:online:n1/0000000000001234".into(),
                "rw:script_incarnation".into(),
                format!("rw:b:app:{number}:seq"),
                "alice".into()
            ]
        );
        assert_eq!(text(8), format!("rw:b:app:{number}"));
        let payload = bytes::Bytes::from(call[9].clone());
        let (header, frame) = message::decode(&payload).unwrap();
        assert_eq!((header.kind, header.user_id, header.sender.shard), (Kind::UserOffline, "alice", SCRIPT_SHARD));
        assert_eq!(frame, pusher_message::watchlist_event("offline", &["alice"]));
        assert_eq!(text(10), "00000000000000ab");
        let too_long = "u".repeat(pusher_message::USER_ID_BYTES_MAX + 1);
        assert!(super::call(&caller(&node), "app", &too_long, Transition::Online).is_err());
    }

    /// Replies: 0 and 1 decide; anything else (an error reply) is a reason, never a panic.
    #[test]
    fn replies() {
        assert_eq!(decided(&Reply::Integer(1)), Ok(true));
        assert_eq!(decided(&Reply::Integer(0)), Ok(false));
        assert!(decided(&Reply::Null).is_err());
        assert!(decided(&Reply::Integer(2)).is_err());
    }
}
