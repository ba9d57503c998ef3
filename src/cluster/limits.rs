//! Cluster-wide app limits (docs/cluster.md, "Cluster-wide queries and limits"): the scripts
//! that count `backend_events_per_second_max` in Redis, exactly per second of Redis's clock,
//! and that share each node's live connections for `max_connections`.
//!
//! Sans-IO: builders return the commands (`EVALSHA` of the scripts `cluster::scripts` loads at
//! every connect), readers take `Reply`s.

use super::commands::Command;
use super::link::Reply;
use super::scripts::{self, scripts};
use super::NodeIdentity;

/// `rate`. KEYS: the app's rate key prefix (`…:rate`). ARGV: events, limit. Admits the events
/// into the current second of Redis's clock unless they would pass the limit; returns 1
/// (admitted, counted) or 0 (refused, not counted). The second's key expires after 2 s.
pub(super) const RATE: &str = r#"
local key = KEYS[1] .. ':' .. redis.call('TIME')[1]
local count = tonumber(redis.call('GET', key) or '0')
if count + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return 0 end
redis.call('INCRBY', key, ARGV[1])
redis.call('EXPIRE', key, 2)
return 1
"#;

/// `connections`. KEYS: the app's `…:conns` hash. ARGV: node, its live connections, how long
/// (ms) an entry counts without being refreshed. Writes this node's entry as `count:ms` (Redis
/// time), deletes entries not refreshed within the window (a node that died or left) and
/// returns the sum of the other nodes' counts.
pub(super) const CONNECTIONS: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. now)
local sum = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local count, at = string.match(entries[i + 1], '^(%d+):(%d+)$')
  if not count or tonumber(at) < now - tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], entries[i])
  elseif entries[i] ~= ARGV[1] then
    sum = sum + tonumber(count)
  end
end
return sum
"#;

/// The `EVALSHA` that admits `events` published events of `app_id` under `limit` per second.
pub fn admit_events(prefix: &str, app_id: &str, events: u32, limit: u32) -> Command {
    let (events, limit) = (events.to_string(), limit.to_string());
    scripts().rate.call(&[&format!("{prefix}:a:{app_id}:rate")], &[events.as_bytes(), limit.as_bytes()])
}

/// Whether `admit_events` admitted; anything but 0 or 1 (an error reply) is a reason.
pub fn admitted(reply: &Reply) -> Result<bool, String> {
    match reply {
        Reply::Integer(1) => Ok(true),
        Reply::Integer(0) => Ok(false),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

/// The `EVALSHA` that writes this node's live connections of `app_id` and reads the others'
/// (entries older than `stale_ms` are dropped).
pub fn share_connections(prefix: &str, app_id: &str, node: &NodeIdentity, connections: u32, stale_ms: u64) -> Command {
    let (node, connections, stale_ms) = (scripts::node_name(node), connections.to_string(), stale_ms.to_string());
    let args: [&[u8]; 3] = [node.as_bytes(), connections.as_bytes(), stale_ms.as_bytes()];
    scripts().connections.call(&[&format!("{prefix}:a:{app_id}:conns")], &args)
}

/// The other nodes' connections from `share_connections`' reply (saturating at `u32::MAX`).
pub fn elsewhere(reply: &Reply) -> Result<u32, String> {
    match reply {
        Reply::Integer(sum) if *sum >= 0 => Ok(u32::try_from(*sum).unwrap_or(u32::MAX)),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calls name the app's keys under the prefix and carry the numbers as decimal text;
    /// replies other than the expected integers are reasons, never panics.
    #[test]
    fn calls_and_replies() {
        let text = |c: &[Vec<u8>], i: usize| String::from_utf8(c[i].clone()).unwrap();
        let rate = admit_events("rw", "app", 3, 10);
        assert_eq!((3..6).map(|i| text(&rate, i)).collect::<Vec<_>>(), ["rw:a:app:rate", "3", "10"]);
        let node = NodeIdentity { node_id: "n1".into(), incarnation: 0xabc };
        let conns = share_connections("rw", "app", &node, 7, 3000);
        assert_eq!(
            (3..7).map(|i| text(&conns, i)).collect::<Vec<_>>(),
            ["rw:a:app:conns", "n1/0000000000000abc", "7", "3000"]
        );
        assert_eq!(admitted(&Reply::Integer(1)), Ok(true));
        assert_eq!(admitted(&Reply::Integer(0)), Ok(false));
        assert!(admitted(&Reply::Null).is_err());
        assert_eq!(elsewhere(&Reply::Integer(5)), Ok(5));
        assert_eq!(elsewhere(&Reply::Integer(i64::MAX)), Ok(u32::MAX));
        assert!(elsewhere(&Reply::Integer(-1)).is_err());
    }
}
