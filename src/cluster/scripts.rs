//! The Lua scripts that decide cluster-wide transitions inside Redis, the keys they touch, and
//! the commands that call them (docs/cluster.md, "Presence, occupancy, users: keys and scripts"
//! and "Dead nodes").
//!
//! Each script is loaded with `SCRIPT LOAD` when a command link connects (`load`) and called
//! with `EVALSHA`; Redis runs one script at a time, so "is this the first connection anywhere?"
//! and "was that the last?" have exactly one answer. The scripts that decide a member change
//! also publish its message to the channel's bucket as the script sender (shard `0xFFFF`,
//! docs/cluster.md "Scripts are senders of their own"): the caller builds the whole message with
//! placeholder incarnation and sequence, and the script splices in the real ones.
//!
//! Sans-IO apart from `load`: builders return `Command`s for `cluster::commands`, and reply
//! readers take `Reply`s. Owns the key layout; knows nothing of shards.

use std::fmt::Write;

use super::commands::Command;
use super::link::{Link, LinkError, Reply};
use super::message::{self, Header, Kind, Sender, SCRIPT_SHARD};
use super::{bucket, NodeIdentity};
use crate::pusher::message::SocketId;

/// Shared by the scripts that publish: splices the script sender's incarnation (kept in
/// Redis, 16 hex digits) and its next number in the bucket into the caller's message (bytes
/// 5–12 and 13–20, little-endian; Lua 5.1 numbers are doubles, so the incarnation is converted
/// digit pair by digit pair and sequences stay exact below 2^53) and `SPUBLISH`es it.
const PUBLISH: &str = r#"
local function publish(incarnation_key, sequence_key, bucket, payload, candidate)
  local incarnation = redis.call('GET', incarnation_key)
  if not incarnation then
    redis.call('SET', incarnation_key, candidate)
    incarnation = candidate
  end
  local sequence = redis.call('HINCRBY', sequence_key, incarnation .. ':65535', 1)
  local bytes = {}
  for i = 15, 1, -2 do bytes[#bytes + 1] = string.char(tonumber(string.sub(incarnation, i, i + 1), 16)) end
  local n = sequence
  for _ = 1, 8 do
    bytes[#bytes + 1] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  redis.call('SPUBLISH', bucket, string.sub(payload, 1, 4) .. table.concat(bytes) .. string.sub(payload, 21))
end
"#;

/// `presence_join`. KEYS: node's users in the channel, users (user → nodes), members
/// (user → info), script incarnation, bucket's `:seq`. ARGV: user, info, members_max,
/// bucket channel, message, incarnation candidate. Returns `{-1}` when the channel is full,
/// else `{decision, incarnation, sequence, members}`: decision 1 (a new member cluster-wide,
/// its message published) or 0, and one atomic snapshot of the members (`HGETALL`) with the
/// script sender's last number in the bucket (0 and "" before its first message), which places
/// the snapshot in the bucket's stream (docs/cluster.md, "The join's place in the stream").
const PRESENCE_JOIN: &str = r#"
local decision = 0
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then
  if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 and redis.call('HLEN', KEYS[3]) >= tonumber(ARGV[3]) then
    return {-1}
  end
  redis.call('SADD', KEYS[1], ARGV[1])
  if redis.call('HINCRBY', KEYS[2], ARGV[1], 1) == 1 then
    redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
    publish(KEYS[4], KEYS[5], ARGV[4], ARGV[5], ARGV[6])
    decision = 1
  end
end
local incarnation = redis.call('GET', KEYS[4]) or ''
local sequence = 0
if incarnation ~= '' then sequence = tonumber(redis.call('HGET', KEYS[5], incarnation .. ':65535') or 0) end
return {decision, incarnation, sequence, redis.call('HGETALL', KEYS[3])}
"#;

/// `presence_leave`. KEYS: as `presence_join`, then the node's tag set and the channel's
/// occupying nodes. ARGV: user, bucket channel, message, incarnation candidate, tag, node.
/// Returns 1 (the member is gone cluster-wide, message published) or 0. Idempotent: a user
/// the node does not hold decides nothing (the reaper relies on it).
const PRESENCE_LEAVE: &str = r#"
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('SCARD', KEYS[1]) == 0 and redis.call('SISMEMBER', KEYS[7], ARGV[6]) == 0 then
  redis.call('SREM', KEYS[6], ARGV[5])
end
if redis.call('HINCRBY', KEYS[2], ARGV[1], -1) > 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
publish(KEYS[4], KEYS[5], ARGV[2], ARGV[3], ARGV[4])
return 1
"#;

/// `occupy`. KEYS: the channel's occupying nodes, the app's occupied channels. ARGV: node,
/// channel. Returns 1 when the channel became occupied cluster-wide.
const OCCUPY: &str = r#"
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[2])
if redis.call('SCARD', KEYS[1]) == 1 then return 1 end
return 0
"#;

/// `vacate`. KEYS: occupying nodes, occupied channels, per-node subscriber counts, the node's
/// users in the channel, the node's tag set. ARGV: node, channel, tag. Returns 1 when the
/// channel became vacant cluster-wide. Idempotent.
const VACATE: &str = r#"
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('SCARD', KEYS[4]) == 0 then redis.call('SREM', KEYS[5], ARGV[3]) end
if redis.call('SCARD', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[2])
  return 1
end
return 0
"#;

/// `subscribers`. KEYS: per-node subscriber counts. ARGV: node, this node's count. Returns
/// the sum over all nodes.
const SUBSCRIBERS: &str = r#"
if tonumber(ARGV[2]) > 0 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) else redis.call('HDEL', KEYS[1], ARGV[1]) end
local sum = 0
for _, count in ipairs(redis.call('HVALS', KEYS[1])) do sum = sum + tonumber(count) end
return sum
"#;

/// `lease`. KEYS: `P:nodes`. ARGV: node, lease_ms, 1 to register (else renew), the node's
/// `node_id/`. Returns 1, or -1 when a renewal finds the lease gone (the node was reaped; it
/// registers again). Registering ends the leases of earlier incarnations of the same `node_id`
/// at once (a restarted node: they are dead), so `claim_dead` takes them next.
const LEASE: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if ARGV[3] == '1' then
  for _, node in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if node ~= ARGV[1] and string.sub(node, 1, #ARGV[4]) == ARGV[4] then redis.call('ZADD', KEYS[1], 0, node) end
  end
end
local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if not held and ARGV[3] ~= '1' then return -1 end
return 1
"#;

/// `claim_dead`. KEYS: `P:nodes`, `P:reaping`. ARGV: lease_ms. Takes one node whose lease (or
/// whose reaper's lease) is in the past, gives it a reaper's lease and returns it; nil if none.
const CLAIM_DEAD: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1)
if #dead == 0 then
  dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1)
  if #dead == 0 then return false end
  redis.call('ZREM', KEYS[1], dead[1])
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), dead[1])
return dead[1]
"#;

/// A script: its name (for errors), its source and the SHA-1 Redis names it by.
pub struct Script {
    /// For logs.
    pub name: &'static str,
    /// The Lua source as loaded.
    pub source: String,
    /// Lower-case hex SHA-1 of `source` (what `SCRIPT LOAD` answers and `EVALSHA` takes).
    pub sha: String,
}

impl Script {
    fn new(name: &'static str, body: &str, publishes: bool) -> Script {
        let source = if publishes { format!("{PUBLISH}{body}") } else { body.to_string() };
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, source.as_bytes());
        Script { name, source, sha: hex::encode(digest.as_ref()) }
    }

    /// `EVALSHA sha numkeys keys… args…`.
    pub(super) fn call(&self, keys: &[&str], args: &[&[u8]]) -> Command {
        let mut command = Vec::with_capacity(3 + keys.len() + args.len());
        command.push(b"EVALSHA".to_vec());
        command.push(self.sha.as_bytes().to_vec());
        command.push(keys.len().to_string().into_bytes());
        command.extend(keys.iter().map(|k| k.as_bytes().to_vec()));
        command.extend(args.iter().map(|a| a.to_vec()));
        command
    }
}

/// Every script, built once.
pub struct Scripts {
    presence_join: Script,
    presence_leave: Script,
    occupy: Script,
    vacate: Script,
    subscribers: Script,
    lease: Script,
    claim_dead: Script,
    /// Watchlists (`cluster::users`).
    pub(super) online: Script,
    pub(super) offline: Script,
    /// App limits (`cluster::limits`).
    pub(super) rate: Script,
    pub(super) connections: Script,
}

impl Scripts {
    fn all(&self) -> [&Script; 11] {
        [
            &self.presence_join,
            &self.presence_leave,
            &self.occupy,
            &self.vacate,
            &self.subscribers,
            &self.lease,
            &self.claim_dead,
            &self.online,
            &self.offline,
            &self.rate,
            &self.connections,
        ]
    }
}

/// The scripts (their SHA-1s are computed once per process).
pub fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        presence_join: Script::new("presence_join", PRESENCE_JOIN, true),
        presence_leave: Script::new("presence_leave", PRESENCE_LEAVE, true),
        occupy: Script::new("occupy", OCCUPY, false),
        vacate: Script::new("vacate", VACATE, false),
        subscribers: Script::new("subscribers", SUBSCRIBERS, false),
        lease: Script::new("lease", LEASE, false),
        claim_dead: Script::new("claim_dead", CLAIM_DEAD, false),
        online: Script::new("online", super::users::ONLINE, true),
        offline: Script::new("offline", super::users::OFFLINE, true),
        rate: Script::new("rate", super::limits::RATE, false),
        connections: Script::new("connections", super::limits::CONNECTIONS, false),
    })
}

/// Loads every script on a freshly connected command link (Redis forgets scripts when it
/// restarts, and a new link may face a new Redis), checking Redis names each by our SHA-1.
pub async fn load(link: &mut Link) -> Result<(), LinkError> {
    for script in scripts().all() {
        link.queue(&[b"SCRIPT", b"LOAD", script.source.as_bytes()])?;
    }
    let mut replies = Vec::new();
    link.flush(&mut replies).await?;
    for (script, reply) in scripts().all().iter().zip(&replies) {
        match reply {
            Reply::BulkString(sha) if sha[..] == *script.sha.as_bytes() => {}
            other => return Err(LinkError::Protocol(format!("SCRIPT LOAD {} answered {other:?}", script.name))),
        }
    }
    Ok(())
}

/// This node's name in Redis keys: `node_id/incarnation` (16 hex digits), so a node restarted
/// with the same `node_id` is a new contributor and can reap its previous incarnation.
pub fn node_name(node: &NodeIdentity) -> String {
    format!("{}/{:016x}", node.node_id, node.incarnation)
}

/// The Redis names one channel's scripts use.
pub struct ChannelKeys {
    /// `{P:c:app:channel}`: the hash tag of the channel's keys.
    tag: String,
    /// The member of `P:n:{node}:keys` naming this channel: `app_id` newline `channel`
    /// (neither may hold a newline, so `parse_tag` splits it back).
    pub entry: String,
    /// The channel's bucket: its pub/sub channel and `:seq` hash.
    bucket_channel: String,
    sequence_key: String,
    prefix: String,
    app_id: String,
}

impl ChannelKeys {
    /// The keys of `channel` of `app_id`, in a deployment with `prefix` and `buckets`.
    pub fn new(prefix: &str, app_id: &str, channel: &str, buckets: u16) -> ChannelKeys {
        let number = bucket::of_channel(channel, buckets);
        let mut bucket_channel = String::new();
        bucket::channel_name(prefix, app_id, number, &mut bucket_channel);
        let mut sequence_key = String::new();
        bucket::sequence_key(prefix, app_id, number, &mut sequence_key);
        ChannelKeys {
            tag: format!("{{{prefix}:c:{app_id}:{channel}}}"),
            entry: format!("{app_id}\n{channel}"),
            bucket_channel,
            sequence_key,
            prefix: prefix.to_string(),
            app_id: app_id.to_string(),
        }
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.tag)
    }

    /// The presence members hash (user → `user_info`).
    pub fn members(&self) -> String {
        self.key("members")
    }

    /// The per-node subscriber counts hash.
    pub fn subscribers(&self) -> String {
        self.key("subs")
    }

    /// The set of nodes with a subscriber.
    pub fn occupiers(&self) -> String {
        self.key("occ")
    }

    /// The users `node` holds in the channel.
    pub fn node_users(&self, node: &str) -> String {
        self.key(&format!("node:{node}"))
    }

    fn script_incarnation(&self) -> String {
        format!("{}:script_incarnation", self.prefix)
    }

    fn occupied(&self) -> String {
        format!("{}:a:{}:occupied", self.prefix, self.app_id)
    }
}

/// `P:n:{node}:keys`: the channels `node` has contributions in (what the reaper walks).
pub fn node_entries(prefix: &str, node: &str) -> String {
    format!("{prefix}:n:{node}:keys")
}

/// `P:a:{app}:occupied`: the app's occupied channels.
pub fn occupied(prefix: &str, app_id: &str) -> String {
    format!("{prefix}:a:{app_id}:occupied")
}

/// `P:nodes` and `P:reaping`: the leases of live nodes and of reapers.
pub fn leases(prefix: &str) -> (String, String) {
    (format!("{prefix}:nodes"), format!("{prefix}:reaping"))
}

/// Splits a `P:n:{node}:keys` member into (app id, channel).
pub fn parse_entry(entry: &[u8]) -> Option<(&str, &str)> {
    std::str::from_utf8(entry).ok()?.split_once('\n')
}

/// A script message: the header the caller fills, with a placeholder sender and sequence the
/// script replaces (both must only be non-zero for the format's checks).
fn script_message(kind: Kind, member: &Member, frame: &[u8], exclude: Option<SocketId>) -> Vec<u8> {
    let Member { node, keys, channel, user_id } = member;
    let header = Header {
        kind,
        sender: Sender { incarnation: u64::MAX, shard: SCRIPT_SHARD },
        sequence: u64::MAX,
        node_id: &node.node_id,
        app_id: &keys.app_id,
        channel,
        user_id,
        exclude,
    };
    let mut payload = Vec::new();
    // The caller validated channel and user id; a refusal here is a bug.
    message::encode(&header, frame, &mut payload).unwrap_or_else(|error| panic!("a script message: {error}"));
    payload
}

/// A random incarnation for the script sender, used only if Redis holds none yet.
fn candidate(rng: &mut fastrand::Rng) -> Vec<u8> {
    format!("{:016x}", rng.u64(1..)).into_bytes()
}

/// A presence call's subject: whose member, on which node.
pub struct Member<'a> {
    /// This node.
    pub node: &'a NodeIdentity,
    /// The channel's keys.
    pub keys: &'a ChannelKeys,
    /// The channel.
    pub channel: &'a str,
    /// The user.
    pub user_id: &'a str,
}

/// `SADD P:n:{node}:keys entry` (before the script, so a reaper finds the contribution) and
/// the `presence_join` script (`frame`: the `member_added` frame); read its answer with
/// `JoinAnswer::read`.
/// `frame` reaches every subscriber but `joiner`.
pub fn presence_join(
    member: &Member,
    info: &str,
    members_max: usize,
    frame: &[u8],
    joiner: SocketId,
    rng: &mut fastrand::Rng,
) -> Vec<Command> {
    let Member { node, keys, user_id, .. } = member;
    let name = node_name(node);
    let payload = script_message(Kind::MemberAdded, member, frame, Some(joiner));
    let node_users = keys.node_users(&name);
    let script_keys =
        [node_users.as_str(), &keys.key("users"), &keys.members(), &keys.script_incarnation(), &keys.sequence_key];
    let max = members_max.to_string();
    let args: [&[u8]; 6] = [
        user_id.as_bytes(),
        info.as_bytes(),
        max.as_bytes(),
        keys.bucket_channel.as_bytes(),
        &payload,
        &candidate(rng),
    ];
    vec![
        vec![b"SADD".to_vec(), node_entries(&keys.prefix, &name).into_bytes(), keys.entry.clone().into_bytes()],
        scripts().presence_join.call(&script_keys, &args),
    ]
}

/// The `presence_leave` script for a member of `node_name` (this node, or a dead one being
/// reaped; `frame`: the `member_removed` frame).
pub fn presence_leave(member: &Member, node_name: &str, frame: &[u8], rng: &mut fastrand::Rng) -> Command {
    let Member { keys, user_id, .. } = member;
    let payload = script_message(Kind::MemberRemoved, member, frame, None);
    let script_keys = [
        keys.node_users(node_name),
        keys.key("users"),
        keys.members(),
        keys.script_incarnation(),
        keys.sequence_key.clone(),
        node_entries(&keys.prefix, node_name),
        keys.occupiers(),
    ];
    let script_keys: Vec<&str> = script_keys.iter().map(String::as_str).collect();
    let args: [&[u8]; 6] = [
        user_id.as_bytes(),
        keys.bucket_channel.as_bytes(),
        &payload,
        &candidate(rng),
        keys.entry.as_bytes(),
        node_name.as_bytes(),
    ];
    scripts().presence_leave.call(&script_keys, &args)
}

/// `SADD P:n:{node}:keys entry` and the `occupy` script.
pub fn occupy(keys: &ChannelKeys, node_name: &str, channel: &str) -> Vec<Command> {
    let script_keys = [keys.occupiers(), keys.occupied()];
    let script_keys: Vec<&str> = script_keys.iter().map(String::as_str).collect();
    vec![
        vec![b"SADD".to_vec(), node_entries(&keys.prefix, node_name).into_bytes(), keys.entry.clone().into_bytes()],
        scripts().occupy.call(&script_keys, &[node_name.as_bytes(), channel.as_bytes()]),
    ]
}

/// The `vacate` script for `node_name` (this node, or a dead one).
pub fn vacate(keys: &ChannelKeys, node_name: &str, channel: &str) -> Command {
    let script_keys = [
        keys.occupiers(),
        keys.occupied(),
        keys.subscribers(),
        keys.node_users(node_name),
        node_entries(&keys.prefix, node_name),
    ];
    let script_keys: Vec<&str> = script_keys.iter().map(String::as_str).collect();
    scripts().vacate.call(&script_keys, &[node_name.as_bytes(), channel.as_bytes(), keys.entry.as_bytes()])
}

/// The `subscribers` script: sets this node's count, returns the cluster-wide sum.
pub fn subscribers(keys: &ChannelKeys, node_name: &str, count: u64) -> Command {
    let count = count.to_string();
    scripts().subscribers.call(&[&keys.subscribers()], &[node_name.as_bytes(), count.as_bytes()])
}

/// The `lease` script: registers (`register`) or renews this node's lease.
pub fn lease(prefix: &str, node: &NodeIdentity, lease_ms: u64, register: bool) -> Command {
    let (nodes, _) = leases(prefix);
    let lease_ms = lease_ms.to_string();
    let register: &[u8] = if register { b"1" } else { b"0" };
    let (name, earlier) = (node_name(node), format!("{}/", node.node_id));
    let args: [&[u8]; 4] = [name.as_bytes(), lease_ms.as_bytes(), register, earlier.as_bytes()];
    scripts().lease.call(&[&nodes], &args)
}

/// The `claim_dead` script.
pub fn claim_dead(prefix: &str, lease_ms: u64) -> Command {
    let (nodes, reaping) = leases(prefix);
    scripts().claim_dead.call(&[&nodes, &reaping], &[lease_ms.to_string().as_bytes()])
}

/// A script's integer answer; an error reply or any other type is `None`.
pub fn integer(reply: &Reply) -> Option<i64> {
    match reply {
        Reply::Integer(n) => Some(*n),
        _ => None,
    }
}

/// The bulk strings of an array reply (`SMEMBERS`, `HKEYS`); `None` for anything else.
pub fn strings(reply: &Reply) -> Option<Vec<&[u8]>> {
    let Reply::Array(items) = reply else { return None };
    items
        .iter()
        .map(|item| match item {
            Reply::BulkString(bytes) => Some(&bytes[..]),
            _ => None,
        })
        .collect()
}

/// What `presence_join` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinAnswer {
    /// The channel is full.
    Full,
    /// Joined.
    Joined {
        /// The user is a new member cluster-wide (its `member_added` was published).
        new_member: bool,
        /// The script sender's last number in the channel's bucket when the members were read
        /// (`None` before its first message there), so the snapshot's place in the stream.
        position: Option<(u64, u64)>,
        /// The `presence` object of `subscription_succeeded`.
        snapshot: String,
    },
}

impl JoinAnswer {
    /// Reads the script's reply; `None` for anything it does not answer.
    pub fn read(reply: &Reply) -> Option<JoinAnswer> {
        let Reply::Array(items) = reply else { return None };
        match items.as_slice() {
            [Reply::Integer(-1)] => Some(JoinAnswer::Full),
            [Reply::Integer(decision @ (0 | 1)), Reply::BulkString(incarnation), Reply::Integer(sequence), members] => {
                let position = match (&incarnation[..], *sequence) {
                    (b"", _) | (_, 0) => None,
                    (hex, sequence) => {
                        let incarnation = u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                        Some((incarnation, u64::try_from(sequence).ok()?))
                    }
                };
                Some(JoinAnswer::Joined { new_member: *decision == 1, position, snapshot: presence_snapshot(members)? })
            }
            _ => None,
        }
    }
}

/// The `presence` object of `subscription_succeeded` from `HGETALL {k}:members` (user, info
/// pairs; the infos are JSON as the members' first connections sent them). `None` if the
/// reply is not such a list.
pub fn presence_snapshot(reply: &Reply) -> Option<String> {
    let items = strings(reply)?;
    if items.len() % 2 != 0 {
        return None;
    }
    let mut ids = String::new();
    let mut hash = String::new();
    for (i, pair) in items.chunks_exact(2).enumerate() {
        let id = serde_json::to_string(std::str::from_utf8(pair[0]).ok()?).ok()?;
        let info = std::str::from_utf8(pair[1]).ok()?;
        if i > 0 {
            ids.push(',');
            hash.push(',');
        }
        ids.push_str(&id);
        let _ = write!(hash, "{id}:{info}");
    }
    let count = items.len() / 2;
    Some(format!("{{\"presence\":{{\"ids\":[{ids}],\"hash\":{{{hash}}},\"count\":{count}}}}}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn bulk(text: &str) -> Reply {
        Reply::BulkString(Bytes::copy_from_slice(text.as_bytes()))
    }

    /// A members hash becomes the `presence` object Pusher clients read; a reply that is not a
    /// list of pairs is refused, not misread.
    #[test]
    fn snapshot_of_the_members_hash() {
        let reply = Reply::Array(vec![bulk("1"), bulk(r#"{"n":1}"#), bulk("u\"2"), bulk("null")]);
        assert_eq!(
            presence_snapshot(&reply).unwrap(),
            r#"{"presence":{"ids":["1","u\"2"],"hash":{"1":{"n":1},"u\"2":null},"count":2}}"#
        );
        assert_eq!(presence_snapshot(&Reply::Array(vec![])).unwrap(), r#"{"presence":{"ids":[],"hash":{},"count":0}}"#);
        assert_eq!(presence_snapshot(&Reply::Array(vec![bulk("1")])), None);
        assert_eq!(presence_snapshot(&Reply::Error("ERR".into())), None);
    }

    /// The join script's answers: full, or a snapshot placed in the stream (or before it).
    #[test]
    fn join_answers() {
        let members = Reply::Array(vec![bulk("1"), bulk("null")]);
        let snapshot = r#"{"presence":{"ids":["1"],"hash":{"1":null},"count":1}}"#.to_string();
        let answer = |items: Vec<Reply>| JoinAnswer::read(&Reply::Array(items));
        assert_eq!(answer(vec![Reply::Integer(-1)]), Some(JoinAnswer::Full));
        assert_eq!(
            answer(vec![Reply::Integer(1), bulk("00000000000000ff"), Reply::Integer(7), members.clone()]),
            Some(JoinAnswer::Joined { new_member: true, position: Some((255, 7)), snapshot: snapshot.clone() })
        );
        assert_eq!(
            answer(vec![Reply::Integer(0), bulk(""), Reply::Integer(0), members.clone()]),
            Some(JoinAnswer::Joined { new_member: false, position: None, snapshot })
        );
        assert_eq!(answer(vec![Reply::Integer(2), bulk(""), Reply::Integer(0), members.clone()]), None);
        assert_eq!(answer(vec![Reply::Integer(0), bulk("xyz"), Reply::Integer(3), members]), None);
        assert_eq!(JoinAnswer::read(&Reply::Error("NOSCRIPT".into())), None);
    }

    /// The keys of one channel share a hash tag, and the reaper's entry splits back into app
    /// and channel.
    #[test]
    fn keys_of_a_channel() {
        let keys = ChannelKeys::new("P", "app-1", "presence-room", 64);
        assert_eq!(keys.members(), "{P:c:app-1:presence-room}:members");
        assert_eq!(keys.node_users("eu-1/00000000000000ff"), "{P:c:app-1:presence-room}:node:eu-1/00000000000000ff");
        assert_eq!(parse_entry(keys.entry.as_bytes()), Some(("app-1", "presence-room")));
        let node = NodeIdentity { node_id: "eu-1".into(), incarnation: 255 };
        assert_eq!(node_name(&node), "eu-1/00000000000000ff");
    }

    /// The placeholder message is a valid one whose sender and sequence sit where the script
    /// splices them (bytes 5–20).
    #[test]
    fn script_message_layout() {
        let node = NodeIdentity { node_id: "eu-1".into(), incarnation: 7 };
        let keys = ChannelKeys::new("P", "1", "presence-a", 64);
        let member = Member { node: &node, keys: &keys, channel: "presence-a", user_id: "u" };
        let payload = script_message(Kind::MemberAdded, &member, b"\x81\x00", None);
        assert_eq!(&payload[2..4], &SCRIPT_SHARD.to_le_bytes());
        assert_eq!(&payload[4..20], &[0xFF; 16]);
        let (header, _) = message::decode_header(&payload).unwrap();
        assert_eq!((header.kind, header.channel, header.user_id), (Kind::MemberAdded, "presence-a", "u"));
    }
}
